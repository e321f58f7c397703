"""Counters, histograms, gauges and the Prometheus endpoint of the consumer, and its log line.

Counts are merged once per durable batch under one lock (the writer thread and the main thread
both add), and exposed as Prometheus counters only at scrape time. Latency (now - the agent's
read time `kl.ts`, when the data is fsynced), fsync time and batch size are prometheus_client
histograms: an operator gets percentiles over any window (`histogram_quantile` over `rate`),
and the periodic log line shows the quantiles of the last interval only, so a start-up backlog
does not read as a slow pipeline for ever after.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from keplerlog import __version__
from keplerlog.metrics_http import (
    CounterMetricFamily,
    FunctionCollector,
    GaugeMetricFamily,
    Histogram,
    Metric,
    Server,
    new_registry,
    render,
    serve,
)

from . import route

log = logging.getLogger(__name__)

PREFIX = "keplerlog_consumer_"
COUNTERS = {
    "records": "Records written to day files (legacy included)",
    "bytes": "Bytes appended to day files",
    "legacy_records": "Legacy Flume records (no kl.v) filed by their line prefix",
    "duplicate_records": "Replayed records dropped (already on disk)",
    "duplicate_bytes": "Replayed bytes dropped (whole records and overlapping heads)",
    "partial_overlaps": "Records partly on disk already; only their new parts were written",
    "gaps": "Records starting beyond the highest written byte of their source file",
    "gap_bytes": "Bytes missing before such records when they arrived (maybe filled later)",
    "gap_fills": "Records that filled (part of) an open hole: a late, out-of-order re-send",
    "gap_fill_bytes": "Bytes written into open holes (gap_bytes - gap_fill_bytes is still missing)",
    "gaps_given_up": "Holes forgotten because a source file had more than 64 open",
    "gap_bytes_given_up": "Bytes of the holes given up (a later fill counts as duplicate)",
    "sources_evicted": "Source files forgotten because a partition tracked more than its cap",
    "lines_joined": "Lines written whole after being carried by more than one record",
    "lines_cut": "Pieces of lines over lines.max_line_bytes, written with the kl-cut marker",
    "newlines_added": "Line ends that did not come within lines.hold_s: written with a newline",
    "unowned_records": "Records of a partition another consumer had locked: not written, not committed",
    "replaced_header_keys": "Records whose header keys were not UTF-8 (read with U+FFFD)",
    "ts_out_of_range": "Records whose kl.ts was too far from now: filed under the receive day",
    "quarantined": "Records written to _quarantine",
    "unsafe_names": "Records rejected for an unsafe service/module name",
    "empty_records": "Records with an empty value (nothing to write)",
    "disk_full": "Writes a full data root refused (ENOSPC/EDQUOT), each retry counted: a batch rolled back, "
    "or the state of a written batch held back",
    "batches": "Batches made durable",
    "commit_failures": "Kafka offset commits that failed (the state file is authoritative)",
    "connect_failures": "Attempts to reach Kafka that failed at start (the log says why)",
    "recovered_intents": "Write-ahead intents of dead consumers completed or undone",
    "watermarks": "Agent watermarks reconciled with the stored byte ranges (never written to a day file)",
    "watermarks_replayed": "Watermarks read again after a restart (already reconciled: skipped)",
    "watermarks_late": "Watermarks dated before yesterday by the agent's clock, counted for yesterday",
    "audit_marks_evicted": "Audit marks forgotten because a partition tracked more than its cap",
    "audit_report_failures": "Daily audit report writes that failed for another reason than a full disk",
}
# Per service and module, from the latest watermark of every file this consumer's partitions hold.
AUDIT_GAUGES = {
    "audit_missing_bytes": "Bytes agents had acknowledged that are in no day file (e.g. deleted unread).",
    "audit_files_incomplete": "Source files with missing bytes as of their latest watermark.",
    "audit_source_lost_bytes": "Bytes agents reported lost at the source (truncated, rotated, deleted).",
}


# Agent read -> fsynced here: under a second when healthy; the 4 s target sits between buckets.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 600)
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 10, 100, 1000, 5000, 20000, 100000)
LATENCY_SAMPLES_PER_BATCH = 256  # a 20,000-record batch costs 256 observations, not 20,000
GAUGE_HELP = {
    "open_files": "Day files held open.",
    "open_files_limit": "Day files the consumer may hold open at once (max_open_files).",
    "held_bytes": "Bytes of incomplete lines held until their end arrives (lines.hold_s).",
    "disk_full_paused": "1 while writing is paused because the data root is full.",
    "last_commit_timestamp_seconds": "Unix time of the last commit (the start time before the first one).",
}


class Metrics:
    """The consumer's counts, gauges and histograms, in a registry of its own."""

    def __init__(self, root: str = "", group: str = "") -> None:
        self._lock = threading.Lock()
        self.root = root
        self.group = group
        self.counts: Counter[str] = Counter()
        self.quarantine_reasons: Counter[str] = Counter()
        self.written_bytes: Counter[tuple[str, str]] = Counter()
        self.written_lines: Counter[tuple[str, str]] = Counter()
        self.gauges: dict[str, float] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.audit: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.registry = new_registry()
        self.registry.register(FunctionCollector(self._families))
        self.latency = Histogram(
            f"{PREFIX}latency_seconds",
            "Agent read time (kl.ts) to fsynced in a day file (sampled per batch).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fsync = Histogram(
            f"{PREFIX}fsync_seconds",
            "Time to fsync a batch's day files.",
            buckets=FSYNC_BUCKETS,
            registry=self.registry,
        )
        self.batch_records = Histogram(
            f"{PREFIX}batch_records",
            "Records per durable batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._last_latency = _buckets(self.latency)

    def add(
        self,
        counts: Counter[str],
        reasons: Counter[str] | None = None,
        written: dict[tuple[str, str], tuple[int, int]] | None = None,
    ) -> None:
        """Merge the counts of a batch that became durable (`written`: bytes, lines per label)."""
        with self._lock:
            self.counts.update(counts)
            if reasons:
                self.quarantine_reasons.update(reasons)
            for labels, (nbytes, nlines) in (written or {}).items():
                self.written_bytes[labels] += nbytes
                self.written_lines[labels] += nlines

    def inc(self, name: str, value: int = 1) -> None:
        """Increment one counter."""
        with self._lock:
            self.counts[name] += value

    def observe_latency(self, now_ms: int, read_ts_ms: list[int]) -> None:
        """Record end-to-end latencies in seconds, at most LATENCY_SAMPLES_PER_BATCH per batch."""
        if not read_ts_ms:
            return
        step = -(-len(read_ts_ms) // LATENCY_SAMPLES_PER_BATCH)  # ceil: never more samples than that
        for ts in read_ts_ms[::step]:
            self.latency.observe(max(0.0, (now_ms - ts) / 1000))

    def set_audit(self, per_partition: Iterable[dict[tuple[str, str], tuple[int, int, int]]]) -> None:
        """Replace the audit gauges: per (service, module) missing bytes, incomplete files, lost bytes.

        At most route.LABELS_CAP label pairs (those with the most missing, then lost bytes), so
        crafted names cannot grow a scrape without bound.
        """
        merged: dict[tuple[str, str], tuple[int, int, int]] = {}
        for totals in per_partition:
            for labels, (missing, incomplete, lost) in totals.items():
                m, i, lo = merged.get(labels, (0, 0, 0))
                merged[labels] = (m + missing, i + incomplete, lo + lost)
        cap = route.LABELS_CAP
        if len(merged) > cap:
            top = sorted(merged, key=lambda k: (merged[k][0], merged[k][2]), reverse=True)[:cap]
            merged = {k: merged[k] for k in top}
        with self._lock:
            self.audit = merged

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        """Replace the per-partition lag (records not yet durable and committed)."""
        with self._lock:
            self.lag = dict(lag)

    def interval_quantiles(self) -> dict[str, float]:
        """p50 and p99 of the latencies observed since the last call (empty if none)."""
        now = _buckets(self.latency)
        delta = [
            (bound, count - before)
            for (bound, count), (_, before) in zip(now, self._last_latency, strict=True)
        ]
        self._last_latency = now
        return {q: v for q in ("0.5", "0.99") if (v := bucket_quantile(float(q), delta)) is not None}

    def _families(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self.counts)
            reasons = dict(self.quarantine_reasons)
            gauges = dict(self.gauges)
            written = [(k, self.written_bytes[k], self.written_lines[k]) for k in sorted(self.written_bytes)]
            lag = sorted(self.lag.items())
            audit = sorted(self.audit.items())
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}{name}", help_text, value=counts.get(name, 0))
        by_reason = CounterMetricFamily(
            f"{PREFIX}quarantined_by_reason", "Records written to _quarantine, by reason", labels=["reason"]
        )
        for reason, value in sorted(reasons.items()):
            by_reason.add_metric([reason], value)
        yield by_reason
        wbytes = CounterMetricFamily(
            f"{PREFIX}written_bytes",
            "Bytes appended to day files per service and module",
            labels=["service", "module"],
        )
        wlines = CounterMetricFamily(
            f"{PREFIX}written_lines",
            "Lines appended to day files per service and module",
            labels=["service", "module"],
        )
        for (service, module), nbytes, nlines in written:
            wbytes.add_metric([service, module], nbytes)
            wlines.add_metric([service, module], nlines)
        yield wbytes
        yield wlines
        lag_family = GaugeMetricFamily(
            f"{PREFIX}lag_records",
            "Records in the partition not yet durable and committed by this consumer",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in lag:
            lag_family.add_metric([topic, str(partition)], value)
        yield lag_family
        for column, (name, help_text) in enumerate(AUDIT_GAUGES.items()):
            family = GaugeMetricFamily(f"{PREFIX}{name}", help_text, labels=["service", "module"])
            for (service, module), values in audit:
                family.add_metric([service, module], values[column])
            yield family
        for name, value in sorted(gauges.items()):
            yield GaugeMetricFamily(f"{PREFIX}{name}", GAUGE_HELP.get(name, name), value=value)
        if self.root:
            try:
                st = os.statvfs(self.root)
            except OSError:
                pass
            else:
                yield GaugeMetricFamily(
                    f"{PREFIX}data_root_free_bytes",
                    "Space left in the data root for this user",
                    value=st.f_bavail * st.f_frsize,
                )
                yield GaugeMetricFamily(
                    f"{PREFIX}data_root_size_bytes",
                    "Size of the data root's file system",
                    value=st.f_blocks * st.f_frsize,
                )
        info = GaugeMetricFamily(
            f"{PREFIX}info", "The consumer's group and version", labels=["group", "version"]
        )
        info.add_metric([self.group, __version__], 1)
        yield info

    def render(self) -> str:
        """Return the page a scrape gets (OpenMetrics text)."""
        return render(self.registry).decode()

    def summary(self) -> str:
        """One log line with the main numbers; latency quantiles of the last interval only."""
        with self._lock:
            c = dict(self.counts)
        q = self.interval_quantiles()
        lat = f"p50={q['0.5']:.3f}s p99={q['0.99']:.3f}s" if q else "p50=- p99=-"
        return (
            f"records={c.get('records', 0)} bytes={c.get('bytes', 0)} "
            f"dup={c.get('duplicate_records', 0)} "
            f"gaps={c.get('gaps', 0)}/{c.get('gap_bytes', 0)}B quarantined={c.get('quarantined', 0)} "
            f"disk_full={c.get('disk_full', 0)} lag={sum(self.lag.values())} {lat}"
        )


def _buckets(histogram: Histogram) -> list[tuple[float, float]]:
    """Return the histogram's cumulative bucket counts as (upper bound, count)."""
    out: list[tuple[float, float]] = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.append((float(sample.labels["le"]), sample.value))
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Return the q-quantile of cumulative buckets, interpolated as histogram_quantile does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class PeriodicLog:
    """Emits Metrics.summary() every `interval` seconds when ticked."""

    def __init__(self, metrics: Metrics, interval: float) -> None:
        self.metrics = metrics
        self.interval = interval
        self._next = time.monotonic() + interval

    def tick(self) -> None:
        """Call often; logs when the interval has passed."""
        if self.interval > 0 and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.interval
            log.info("stats %s", self.metrics.summary())


def start_server(metrics: Metrics, host: str, port: int) -> Server | None:
    """Serve the consumer's registry; None, logged, when the port is taken (as the agent does)."""
    return serve(metrics.registry, host, port, "keplerlog-consumer")

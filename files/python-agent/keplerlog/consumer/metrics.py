"""Counters, end-to-end latency quantiles, Prometheus text endpoint and a periodic log line.

Small on purpose (no client library dependency): a few counters, a bounded reservoir of recent
latencies (now - kl.ts at fsync time) from which p50/p99 are computed at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    "disk_full": "Batches rolled back because of ENOSPC/EDQUOT",
    "batches": "Batches made durable",
    "commit_failures": "Kafka offset commits that failed (the state file is authoritative)",
    "connect_failures": "Attempts to reach Kafka that failed at start (the log says why)",
    "recovered_intents": "Write-ahead intents of dead consumers completed or undone",
}


class Metrics:
    """Thread-safe counters plus a latency reservoir."""

    def __init__(self, reservoir: int = 4096) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.quarantine_reasons: Counter[str] = Counter()
        self._latency: deque[float] = deque(maxlen=reservoir)
        self.gauges: dict[str, float] = {}

    def add(self, counts: Counter[str], reasons: Counter[str] | None = None) -> None:
        """Merge the counts of a batch that became durable."""
        with self._lock:
            self.counts.update(counts)
            if reasons:
                self.quarantine_reasons.update(reasons)

    def inc(self, name: str, value: int = 1) -> None:
        """Increment one counter."""
        with self._lock:
            self.counts[name] += value

    def observe_latency(self, now_ms: int, read_ts_ms: list[int]) -> None:
        """Record end-to-end latencies in seconds; samples at most ~256 per batch."""
        if not read_ts_ms:
            return
        step = max(1, len(read_ts_ms) // 256)
        with self._lock:
            for ts in read_ts_ms[::step]:
                self._latency.append(max(0.0, (now_ms - ts) / 1000))

    def quantiles(self) -> dict[str, float]:
        """p50 and p99 of the recent latencies (empty when nothing was observed)."""
        with self._lock:
            data = sorted(self._latency)
        if not data:
            return {}
        return {q: data[min(len(data) - 1, int(float(q) * len(data)))] for q in ("0.5", "0.99")}

    def render(self) -> str:
        """Prometheus text exposition format."""
        with self._lock:
            counts = dict(self.counts)
            reasons = dict(self.quarantine_reasons)
            gauges = dict(self.gauges)
        out: list[str] = []
        for name, help_text in COUNTERS.items():
            out += [
                f"# HELP {PREFIX}{name}_total {help_text}",
                f"# TYPE {PREFIX}{name}_total counter",
                f"{PREFIX}{name}_total {counts.get(name, 0)}",
            ]
        out += [f"# TYPE {PREFIX}quarantined_by_reason_total counter"]
        for reason, value in sorted(reasons.items()):
            label = reason.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
            out.append(f'{PREFIX}quarantined_by_reason_total{{reason="{label}"}} {value}')
        for name, value in sorted(gauges.items()):
            out += [f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {value}"]
        out += [
            f"# HELP {PREFIX}latency_seconds now - kl.ts when the data was fsynced",
            f"# TYPE {PREFIX}latency_seconds summary",
        ]
        for q, value in self.quantiles().items():
            out.append(f'{PREFIX}latency_seconds{{quantile="{q}"}} {value:.3f}')
        return "\n".join(out) + "\n"

    def summary(self) -> str:
        """One log line with the main numbers."""
        with self._lock:
            c = dict(self.counts)
        q = self.quantiles()
        return (
            f"records={c.get('records', 0)} bytes={c.get('bytes', 0)} "
            f"dup={c.get('duplicate_records', 0)} "
            f"gaps={c.get('gaps', 0)}/{c.get('gap_bytes', 0)}B quarantined={c.get('quarantined', 0)} "
            f"disk_full={c.get('disk_full', 0)} p50={q.get('0.5', 0):.3f}s p99={q.get('0.99', 0):.3f}s"
        )


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


def serve(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer | None:
    """Serve GET /metrics on host:port in a daemon thread; None (logged) if the port is taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        log.error("metrics endpoint %s:%d unavailable: %s", host, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server

"""Counters, per-file lag, histograms, the Prometheus endpoint and a periodic summary log line.

Counters are plain integers owned by the main thread (ack callbacks are funnelled through a
queue into it), so no locks on the hot path; `AgentMetrics` turns them into Prometheus counter
families only at scrape time, from the metrics thread, which is safe under the GIL and at worst
one update stale. Histograms (ack latency, record size) are prometheus_client's own: observed
once per record, not per line. The endpoint binds to loopback by default: the agent runs on
application hosts and must not open ports to the network unless told to (`metrics.host`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from keplerlog import __version__
from keplerlog.metrics_http import (
    CollectorRegistry,
    CounterMetricFamily,
    FunctionCollector,
    GaugeMetricFamily,
    Histogram,
    Metric,
    Server,
    new_registry,
    render,
    safe_label,
    serve,
    stop,
)

log = logging.getLogger(__name__)

# Read -> acknowledged by Kafka: tens of ms when healthy, the producer's linger and retries
# above that, the delivery timeout (120 s) at the top.
ACK_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
RECORD_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)


@dataclass(slots=True)
class Counters:
    """Monotonic counters (Prometheus `_total`) of the agent."""

    lines_read: int = 0
    bytes_read: int = 0
    lines_sent: int = 0
    bytes_sent: int = 0
    records_sent: int = 0
    lines_acked: int = 0
    bytes_acked: int = 0
    records_acked: int = 0
    lines_split: int = 0
    send_errors: int = 0
    errors: int = 0
    rewinds: int = 0
    rotations: int = 0
    truncations: int = 0
    files_opened: int = 0
    files_closed: int = 0
    checkpoints: int = 0
    lost_bytes: int = 0
    fd_exhausted: int = 0
    producer_renewals: int = 0
    watermarks_sent: int = 0
    watermarks_failed: int = 0


_HELP = {
    "lines_read": "Newline-terminated lines read from files.",
    "bytes_read": "Bytes read from files.",
    "lines_sent": "Lines handed to the Kafka producer (kl.lines summed).",
    "bytes_sent": "Record value bytes handed to the Kafka producer.",
    "records_sent": "Records handed to the Kafka producer.",
    "lines_acked": "Lines acknowledged by Kafka.",
    "bytes_acked": "Record value bytes acknowledged by Kafka.",
    "records_acked": "Records acknowledged by Kafka.",
    "lines_split": "Lines longer than max_line_bytes that were cut into pieces.",
    "send_errors": "Records whose send failed (they are re-read and re-sent).",
    "errors": "Other errors (I/O, unreadable files).",
    "rewinds": "Times a file was re-read from a failed record's offset.",
    "rotations": "Followed files that were renamed away or deleted.",
    "truncations": "Followed files that were truncated (copytruncate or rewrite).",
    "files_opened": "Files opened for following.",
    "files_closed": "Files closed after being fully shipped (rotated, deleted or idle).",
    "fd_exhausted": "Opens or rescans refused for want of file descriptors (EMFILE/ENFILE).",
    "checkpoints": "State file writes.",
    "lost_bytes": (
        "Bytes seen but never shipped: truncated before they were read or failed after, rotated away "
        "while the agent was stopped, deleted before they were read."
    ),
    "producer_renewals": "Kafka producers replaced after failing for good (kafka-python's fatal state).",
    "watermarks_sent": "Watermarks (per-file byte accounts for the audit) handed to the Kafka producer.",
    "watermarks_failed": "Watermarks whose send failed (sent again at the next interval).",
}


@dataclass(frozen=True, slots=True)
class FileGauge:
    """Per-file gauges: current size and acked offset (lag = size - acked)."""

    path: str
    file_id: str
    module: str
    size: int
    acked: int

    @property
    def lag(self) -> int:
        """Bytes in the file not yet acknowledged by Kafka."""
        return max(0, self.size - self.acked)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the main thread exposes to a scrape (built by the agent on the metrics thread)."""

    service: str
    files: list[FileGauge]
    gauges: dict[str, float]
    paused: dict[str, bool]


class AgentMetrics:
    """The agent's registry: its counters, gauges and histograms plus the process collector."""

    def __init__(self, counters: Counters, snapshot: Callable[[], Snapshot]) -> None:
        self.counters = counters
        self._snapshot = snapshot
        self.registry: CollectorRegistry = new_registry()
        self.registry.register(FunctionCollector(self._families))
        self.ack_latency = Histogram(
            "keplerlog_agent_ack_latency_seconds",
            "Read from the file to acknowledged by Kafka, per record.",
            buckets=ACK_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.record_bytes = Histogram(
            "keplerlog_agent_record_bytes",
            "Size of the record values sent (the batches of lines).",
            buckets=RECORD_BYTES_BUCKETS,
            registry=self.registry,
        )
        self._server: Server | None = None

    def _families(self) -> Iterator[Metric]:
        for f in fields(self.counters):
            yield CounterMetricFamily(
                f"keplerlog_agent_{f.name}", _HELP.get(f.name, f.name), value=getattr(self.counters, f.name)
            )
        snap = self._snapshot()
        info = GaugeMetricFamily(
            "keplerlog_agent_info", "The agent's service and version.", labels=["service", "version"]
        )
        info.add_metric([snap.service, __version__], 1)
        yield info
        for key, value in sorted(snap.gauges.items()):
            yield GaugeMetricFamily(f"keplerlog_agent_{key}", _GAUGE_HELP.get(key, key), value=value)
        paused = GaugeMetricFamily(
            "keplerlog_agent_paused",
            "1 while reading is paused: the buffer is full (memory) or Kafka refuses or is away (kafka).",
            labels=["reason"],
        )
        for reason, on in sorted(snap.paused.items()):
            paused.add_metric([reason], 1 if on else 0)
        yield paused
        for name, attr, help_text in _FILE_GAUGES:
            family = GaugeMetricFamily(
                f"keplerlog_agent_{name}", help_text, labels=["path", "file", "module"]
            )
            for g in snap.files:
                family.add_metric([safe_label(g.path), g.file_id, g.module], getattr(g, attr))
            yield family

    def render(self) -> bytes:
        """Return the page a scrape gets (OpenMetrics text)."""
        return render(self.registry)

    def start(self, host: str, port: int) -> int | None:
        """Serve the registry; the bound port, or None when it is taken (logged, not fatal)."""
        self._server = serve(self.registry, host, port, "keplerlog-agent")
        return None if self._server is None else int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving."""
        stop(self._server)
        self._server = None


_GAUGE_HELP = {
    "inflight_bytes": "Bytes handed to the producer and not acknowledged yet.",
    "files_open": "Files followed with an open descriptor.",
    "files_open_limit": "Files the agent may keep open at once (descriptor limit minus a reserve).",
    "files_waiting": "Files a glob matches that wait for a free descriptor slot.",
    "files_closed_known": "Files shipped to their end, closed, and remembered by identity.",
    "kafka_connected": "1 while Kafka is reachable: a live broker connection, or nothing waiting to be sent.",
}
_FILE_GAUGES = (
    ("file_lag_bytes", "lag", "Bytes of the file not yet acknowledged by Kafka."),
    ("file_size_bytes", "size", "Size of the file when last looked at."),
    ("file_acked_bytes", "acked", "Offset up to which the file is acknowledged by Kafka."),
)


def summary(counters: Counters, files: list[FileGauge], gauges: dict[str, float]) -> str:
    """One log line with the numbers an operator looks at first."""
    lag = sum(g.lag for g in files)
    return (
        f"files={len(files)} lag_bytes={lag} inflight_bytes={int(gauges.get('inflight_bytes', 0))} "
        f"lines_read={counters.lines_read} lines_acked={counters.lines_acked} "
        f"records_acked={counters.records_acked} lines_split={counters.lines_split} "
        f"send_errors={counters.send_errors} errors={counters.errors}"
    )

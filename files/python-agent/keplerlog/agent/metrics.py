"""Counters, per-file lag, Prometheus text on 127.0.0.1 and a periodic summary log line.

Counters are plain integers owned by the main thread (ack callbacks are funnelled through a
queue into it), so no locks; the HTTP thread only reads them, which is safe under the GIL and
at worst one update stale. The endpoint binds to loopback only: the agent runs on application
hosts and must not open ports to the network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger(__name__)


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
    "lost_bytes": "Bytes that failed to send after their file was truncated (cannot be re-read).",
    "producer_renewals": "Kafka producers replaced after failing for good (kafka-python's fatal state).",
}


@dataclass(frozen=True, slots=True)
class FileGauge:
    """Per-file gauges: current size and acked offset (lag = size - acked)."""

    path: str
    file_id: str
    size: int
    acked: int

    @property
    def lag(self) -> int:
        """Bytes in the file not yet acknowledged by Kafka."""
        return max(0, self.size - self.acked)


def _label(value: str) -> str:
    """Return a label value as valid UTF-8 (undecodable file-name bytes become U+FFFD), escaped."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        raw = value.encode("utf-8", "replace")
    text = raw.decode("utf-8", "replace")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(counters: Counters, files: list[FileGauge], gauges: dict[str, float]) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for f in fields(counters):
        name = f"keplerlog_agent_{f.name}_total"
        lines += [
            f"# HELP {name} {_HELP.get(f.name, f.name)}",
            f"# TYPE {name} counter",
            f"{name} {getattr(counters, f.name)}",
        ]
    for key, value in sorted(gauges.items()):
        name = f"keplerlog_agent_{key}"
        lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
    for name, attr in (("file_lag_bytes", "lag"), ("file_size_bytes", "size"), ("file_acked_bytes", "acked")):
        lines.append(f"# TYPE keplerlog_agent_{name} gauge")
        for g in files:
            lines.append(
                f'keplerlog_agent_{name}{{path="{_label(g.path)}",file="{_label(g.file_id)}"}} '
                f"{getattr(g, attr)}"
            )
    return "\n".join(lines) + "\n"


def summary(counters: Counters, files: list[FileGauge], gauges: dict[str, float]) -> str:
    """One log line with the numbers an operator looks at first."""
    lag = sum(g.lag for g in files)
    return (
        f"files={len(files)} lag_bytes={lag} inflight_bytes={int(gauges.get('inflight_bytes', 0))} "
        f"lines_read={counters.lines_read} lines_acked={counters.lines_acked} "
        f"records_acked={counters.records_acked} lines_split={counters.lines_split} "
        f"send_errors={counters.send_errors} errors={counters.errors}"
    )


class MetricsServer:
    """Serves `render()` on http://127.0.0.1:port/metrics from a daemon thread."""

    def __init__(self, port: int, snapshot: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                try:
                    body = snapshot().encode()
                except Exception:  # the endpoint must never take the agent down
                    log.exception("metrics snapshot failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

"""The one metrics HTTP endpoint of the agent and the consumer.

Both serve a registry of their own (never the library's global one, so two components or two
tests in one process do not collide) with the standard process collector (CPU, resident memory,
open descriptors against their limit). A port already taken is the same for both: an error in
the log and the component runs on without metrics. Metrics are for watching the pipeline; they
must never be the reason it stops shipping, nor a crash loop under a supervisor.

The page is prometheus_client's OpenMetrics 1.0 text (Prometheus asks for it first and parses it
natively; the sample lines are those of the older text format). It is served by the small
`socketserver` handler below, not by prometheus_client's `start_http_server`: that one and the
older text format live in `prometheus_client.exposition`, which imports http.server, urllib.request,
email and ssl (OpenSSL's libcrypto). Measured in the agent, that stack was ~8 MB of a ~36 MB
resident set, a fifth of the agent's 40 MB budget, to answer one GET. `lazyinit` keeps the
package's `__init__` (which imports `exposition`) from running, so only the registry, the metric
types and the OpenMetrics writer are loaded. That only works if this module is the first to import
prometheus_client: the components import its names from here, never from the package.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol

from keplerlog import lazyinit

lazyinit.defer_package_init("prometheus_client")  # before its first import: see the docstring
from prometheus_client.metrics import Histogram, disable_created_metrics  # noqa: E402
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402
from prometheus_client.process_collector import ProcessCollector  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

# What the components use of prometheus_client, imported from here only (see the docstring).
__all__ = [
    "CollectorRegistry",
    "CounterMetricFamily",
    "FunctionCollector",
    "GaugeMetricFamily",
    "Histogram",
    "Metric",
    "Server",
    "new_registry",
    "render",
    "safe_label",
    "serve",
    "stop",
]

log = logging.getLogger(__name__)

# `_created` series (a timestamp per counter and histogram) double the page and no rule uses them.
disable_created_metrics()


class Server(Protocol):
    """What `serve` returns: the metrics server, serving from a daemon thread."""

    server_address: tuple[str, int]

    def shutdown(self) -> None:
        """Stop the serving loop."""

    def server_close(self) -> None:
        """Release the socket."""


REQUEST_LIMIT = 8192  # bytes of request line and headers a scrape may send (Prometheus: ~300)
# A client frees its thread this long after it connected if its request is not complete by then:
# a deadline for the whole request, not a timeout per read, so sending a byte now and then
# does not hold a slot for longer (see _Handler._read_head).
CLIENT_TIMEOUT_S = 10.0
# Connections served at once. Prometheus scrapes a target one request at a time, so a few slots
# leave room for a second scraper and a person with curl, while a flood of idle connections
# costs at most this many threads (each a stack and a socket) instead of one thread per
# connection for CLIENT_TIMEOUT_S. With every slot taken, a new connection takes the slot of the
# one that has waited longest for its request to arrive (a scraper sends it at once): idle
# connections cannot shut scrapes out. Only when every slot is answering is it closed unanswered.
MAX_CLIENTS = 8
EVICT_WAIT_S = 1.0  # how long a new connection waits for the slot of the one it closed


def render(registry: CollectorRegistry) -> bytes:
    """Return the page a scrape gets: the registry in OpenMetrics 1.0 text."""
    return generate_latest(registry)


class _Handler(socketserver.StreamRequestHandler):
    """One HTTP/1.0 exchange: GET or HEAD of /metrics (or /), anything else an error status.

    The connection is closed after each answer, which every scraper handles. Requests are read
    with a bound and a timeout, so a slow or hostile client costs one thread for a while, never
    the component.
    """

    timeout = CLIENT_TIMEOUT_S
    STATUS: ClassVar[dict[int, str]] = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        431: "Request Header Fields Too Large",
        500: "Internal Server Error",
    }

    def handle(self) -> None:
        try:
            status, body, head = self._answer()
        except OSError:  # timed out or reset while reading: nobody to answer
            return
        ctype = CONTENT_TYPE_LATEST if status == 200 else "text/plain; charset=utf-8"
        header = (
            f"HTTP/1.0 {status} {self.STATUS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            self.wfile.write(header.encode("ascii") + (b"" if head else body))
        except OSError:  # the client went away
            return

    def _read_head(self) -> bytes | None:
        """Return the request line and headers (up to the blank line); None if over REQUEST_LIMIT.

        Read straight from the socket with what is left of `timeout` as each read's timeout, so
        the timeout bounds the whole request: with a timeout per read (the buffered reader's
        readline), a client sending one byte every few seconds held its slot for hours, and
        MAX_CLIENTS of them shut every scrape out. Raises TimeoutError at the deadline. A client
        that stops sending early (end of stream) gets an answer to what it sent.
        """
        server: _MetricsServer = self.server  # type: ignore[assignment]
        conn = self.connection
        deadline = time.monotonic() + self.timeout
        head = b""
        try:  # waiting for its request since it was accepted (`process_request`)
            while b"\n\r\n" not in head and b"\n\n" not in head:
                if len(head) >= REQUEST_LIMIT:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("request not complete by its deadline")
                conn.settimeout(left)
                chunk = conn.recv(REQUEST_LIMIT - len(head))
                if not chunk:
                    break
                head += chunk
        finally:
            still_mine = server.waiting(conn, False)
        if not still_mine:
            raise ConnectionAbortedError("closed to make room for a new connection")
        conn.settimeout(self.timeout)  # for the answer: a client that does not read
        return head

    def _answer(self) -> tuple[int, bytes, bool]:
        """Read the request; return (status, body, whether it was a HEAD)."""
        head = self._read_head()
        if head is None:
            return 431, b"request too large\n", False
        request = head.partition(b"\n")[0] if b"\n" in head else b""  # headers are not used
        parts = request.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", False
        method, target = parts[0], parts[1]
        head = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET and HEAD\n", head
        if target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return 404, b"see /metrics\n", head
        registry: CollectorRegistry = self.server.registry  # type: ignore[attr-defined]
        try:
            return 200, render(registry), head
        except Exception:  # a collector's bug: an error page and a log line, never a dead server
            log.exception("metrics: rendering the page failed")
            return 500, b"rendering failed\n", head


class _MetricsServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server that knows its registry, with at most MAX_CLIENTS threads serving.

    Threads die with the process. A connection over the cap closes the one that has waited
    longest for its request and takes its slot (`evicted`); if every slot is answering a
    request, it is closed at once (`refused`), never queued behind them.
    """

    daemon_threads = True
    allow_reuse_address = True
    # Connections not accepted yet. The default 5 overflowed in a burst of connects (each over
    # the slots costs an eviction): the kernel dropped the rest, and their clients, a scrape
    # among them, retried only after 1 s.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, family: int) -> None:
        self.address_family = family
        self.registry = registry
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.refused = 0
        self.evicted = 0
        self._waiting: dict[socket.socket, None] = {}  # no complete request yet, oldest first
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def waiting(self, conn: socket.socket, waits: bool) -> bool:
        """Note that `conn` waits for its request, or no longer; False if it was closed meanwhile.

        Noted when it gets its slot, in the order connections are accepted (the dict keeps it),
        so the oldest is the first to give way, whether or not its thread has started yet.
        """
        with self._lock:
            if waits:
                self._waiting[conn] = None
                return True
            if conn not in self._waiting:
                return False
            del self._waiting[conn]
            return True

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request; True once its slot is free."""
        with self._lock:
            if not self._waiting:
                return False
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
        with contextlib.suppress(OSError):  # its handler's read returns at once, and it ends
            oldest.shutdown(socket.SHUT_RDWR)
        if not self.slots.acquire(timeout=EVICT_WAIT_S):
            return False
        self.evicted += 1
        return True

    def process_request(self, request: socket.socket, client_address: object) -> None:
        """Serve from a thread of its own if a slot is free or made free; otherwise close it."""
        if not self.slots.acquire(blocking=False) and not self._make_room():
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "metrics: %d connections refused, %d already being served", self.refused, MAX_CLIENTS
                )
            self.shutdown_request(request)
            return
        self.waiting(request, True)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the slot is not released by one
            self.waiting(request, False)
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        """Serve one connection, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.waiting(request, False)  # if its handler never read (failed before it)
            self.slots.release()


def serve(registry: CollectorRegistry, host: str, port: int, component: str) -> Server | None:
    """Serve /metrics on host:port from a daemon thread; None, logged, when it cannot bind."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = _MetricsServer((host, port), registry, family)
    except OSError as exc:
        log.error(
            "%s: metrics endpoint %s:%d unavailable (%s); running without metrics",
            component,
            host,
            port,
            exc.strerror or exc,
        )
        return None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("%s: metrics on http://%s:%d/metrics", component, host, server.server_address[1])
    return server


class FunctionCollector:
    """A collector whose metric families come from a function called at scrape time.

    The hot paths keep plain integers (an increment costs nothing next to a labelled child's
    lock); this turns them into counters and gauges only when Prometheus asks.
    """

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        """Families for one scrape."""
        return self._families()


def new_registry() -> CollectorRegistry:
    """Return a registry with the process collector (process_* metrics) and nothing else."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def stop(server: Server | None) -> None:
    """Stop serving and release the port (no-op without a server)."""
    if server is not None:
        server.shutdown()
        server.server_close()


def safe_label(value: str) -> str:
    """Return a label value as valid UTF-8 (undecodable file-name bytes become U+FFFD)."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")

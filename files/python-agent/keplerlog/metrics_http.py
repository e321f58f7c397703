"""The one metrics HTTP endpoint of the agent and the consumer (prometheus_client's server).

Both serve a registry of their own (never the library's global one, so two components or two
tests in one process do not collide) with the standard process collector (CPU, resident memory,
open descriptors against their limit). A port already taken is the same for both: an error in
the log and the component runs on without metrics. Metrics are for watching the pipeline; they
must never be the reason it stops shipping, nor a crash loop under a supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, start_http_server
from prometheus_client.core import Metric

log = logging.getLogger(__name__)

# `_created` series (a timestamp per counter and histogram) double the page and no rule uses them.
disable_created_metrics()


class Server(Protocol):
    """What `serve` returns: the WSGI server prometheus_client runs in a daemon thread."""

    server_address: tuple[str, int]

    def shutdown(self) -> None:
        """Stop the serving loop."""

    def server_close(self) -> None:
        """Release the socket."""


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


def serve(registry: CollectorRegistry, host: str, port: int, component: str) -> Server | None:
    """Serve /metrics on host:port from a daemon thread; None, logged, when it cannot bind."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error(
            "%s: metrics endpoint %s:%d unavailable (%s); running without metrics",
            component,
            host,
            port,
            exc.strerror or exc,
        )
        return None
    log.info("%s: metrics on http://%s:%d/metrics", component, host, server.server_address[1])
    return server


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

"""The one metrics endpoint of the agent and the consumer: served, or logged when the port is taken."""

import logging
import socket
import urllib.request

from keplerlog.agent.metrics import AgentMetrics, Counters, Snapshot
from keplerlog.consumer.metrics import Metrics, start_server
from keplerlog.metrics_http import stop


def _taken_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def _agent_metrics():
    snapshot = Snapshot("shop", [], {}, {"memory": False, "kafka": False})
    return AgentMetrics(Counters(lines_read=3), lambda: snapshot)


def test_both_components_run_on_without_metrics_when_the_port_is_taken(caplog):
    sock, port = _taken_port()
    try:
        with caplog.at_level(logging.ERROR):
            assert _agent_metrics().start("127.0.0.1", port) is None
            assert start_server(Metrics(), "127.0.0.1", port) is None
    finally:
        sock.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert all(f"127.0.0.1:{port} unavailable" in e and "running without metrics" in e for e in errors)


def test_the_endpoint_serves_the_registry_and_releases_its_port():
    m = _agent_metrics()
    port = m.start("127.0.0.1", 0)
    assert port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
    assert "keplerlog_agent_lines_read_total 3.0" in body and "process_cpu_seconds_total" in body
    assert "_created" not in body  # no timestamp series per counter
    again = start_server(Metrics(), "127.0.0.1", port)  # the port is free again
    assert again is not None
    stop(again)

"""The one metrics endpoint of the agent and the consumer: served, or logged when the port is taken."""

import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from keplerlog import metrics_http
from keplerlog.agent.metrics import AgentMetrics, Counters, Snapshot
from keplerlog.consumer.metrics import Metrics, start_server
from keplerlog.metrics_http import REQUEST_LIMIT, stop


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


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return all the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def served():
    m = _agent_metrics()
    port = m.start("127.0.0.1", 0)
    assert port
    yield port
    m.stop()


def test_a_scrape_gets_openmetrics_with_its_length(served):
    with urllib.request.urlopen(f"http://127.0.0.1:{served}/metrics", timeout=5) as resp:
        body = resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert int(resp.headers["Content-Length"]) == len(body)
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["keplerlog_agent_lines_read"].samples[0].value == 3


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # a TLS hello
        (b"GET /metrics\r\n\r\n", b"400"),  # HTTP/0.9: no version
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (10 * REQUEST_LIMIT) + b"\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: abc\r\n" * (REQUEST_LIMIT // 4) + b"\r\n", b"431"),
    ],
)
def test_bad_requests_get_an_error_status_and_the_next_scrape_is_served(served, request_bytes, status):
    answer = _exchange(served, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b"keplerlog_agent" not in answer
    ok = _exchange(served, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.0 200 OK\r\n") and ok.endswith(b"# EOF\n")


def test_head_gets_the_headers_only(served):
    answer = _exchange(served, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    assert head.startswith(b"HTTP/1.0 200") and length > 100 and body == b""


def test_a_client_stalled_past_the_timeout_is_dropped_and_others_are_served_meanwhile(monkeypatch):
    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.5)
    m = _agent_metrics()
    port = m.start("127.0.0.1", 0)
    try:
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
        stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        started = time.monotonic()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert body.endswith(b"# EOF\n") and time.monotonic() - started < 0.5  # not behind it
        assert stalled.recv(100) == b""  # closed without an answer once its 0.5 s ran out
        assert 0.3 < time.monotonic() - started < 4
        stalled.close()
    finally:
        m.stop()


def test_a_client_dribbling_its_request_is_dropped_at_the_deadline_not_held_while_it_sends(monkeypatch):
    """A request sent one byte at a time, each well inside the timeout: the timeout bounds the
    whole request, so the connection goes at the deadline, however long the client would go on
    (here up to 5x the deadline). Per read, it held a slot for as long as it sent: MAX_CLIENTS
    such clients would have shut out every scrape for hours."""
    monkeypatch.setattr(metrics_http._Handler, "timeout", 1.0)
    m = _agent_metrics()
    port = m.start("127.0.0.1", 0)
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        sent, closed_after = 0, None
        while time.monotonic() - started < 5:  # 5x the deadline
            time.sleep(0.1)  # 10x faster than the timeout
            try:
                slow.sendall(b"X")
                sent += 1
            except OSError:  # reset: the server closed it
                closed_after = time.monotonic() - started
                break
            slow.settimeout(0.001)
            try:
                answer = slow.recv(100)
            except TimeoutError:
                continue
            finally:
                slow.settimeout(5)
            assert answer == b""  # closed, never answered
            closed_after = time.monotonic() - started
            break
        assert sent >= 3  # it did dribble, inside the per-read timeout, before it was dropped
        assert closed_after is not None and 0.9 < closed_after < 2.5, closed_after
        slow.close()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert body.endswith(b"# EOF\n")
    finally:
        m.stop()


def _wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_idle_connections_past_the_slots_hold_at_most_max_clients_threads_and_never_shut_out_a_scrape():
    """More connections that never send than the slots and the listen queue together: at most
    MAX_CLIENTS threads exist, each new one closes the one that waited longest (the newest
    MAX_CLIENTS are held), every one is accepted (past the listen queue some wait for the
    client's 1 s retry); a scrape made while they hold every slot is answered at once, not after
    their timeout (10 s)."""
    server = metrics_http.serve(metrics_http.new_registry(), "127.0.0.1", 0, "test")
    assert server is not None
    port = server.server_address[1]
    before = threading.active_count()
    socks = []
    count = metrics_http._MetricsServer.request_queue_size + 2 * metrics_http.MAX_CLIENTS
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            # + 1: an evicted thread gives its slot back just before it ends
            assert threading.active_count() - before <= metrics_http.MAX_CLIENTS + 1
        evict = count - metrics_http.MAX_CLIENTS
        _wait_for(lambda: server.evicted == evict, f"{server.evicted} evicted")  # type: ignore[attr-defined]
        _wait_for(lambda: threading.active_count() - before == metrics_http.MAX_CLIENTS, "threads")
        assert server.refused == 0  # type: ignore[attr-defined]
        states = []
        for sock in socks:
            sock.settimeout(0.05)
            try:
                states.append("closed" if sock.recv(100) == b"" else "answered")
            except TimeoutError:  # holding a slot, waiting for its request
                states.append("held")
        held = ["held"] * metrics_http.MAX_CLIENTS
        assert states == ["closed"] * evict + held  # the oldest went first, unanswered
        started = time.monotonic()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert body.endswith(b"# EOF\n") and time.monotonic() - started < metrics_http.EVICT_WAIT_S
        assert server.evicted == evict + 1  # type: ignore[attr-defined]
        for sock in socks:
            sock.close()
        socks.clear()
        _wait_for(lambda: threading.active_count() == before, "the held slots are given back")
    finally:
        for sock in socks:
            sock.close()
        stop(server)


def test_a_connection_is_refused_only_when_every_slot_is_answering(monkeypatch):
    """Every slot busy answering (a page that takes a while to render): a new connection is
    closed unanswered and counted, none of the answering ones is cut short."""
    gate = threading.Event()
    rendering = threading.Semaphore(0)

    def slow_render(registry):
        rendering.release()
        gate.wait(5)
        return b"# EOF\n"

    monkeypatch.setattr(metrics_http, "render", slow_render)
    server = metrics_http.serve(metrics_http.new_registry(), "127.0.0.1", 0, "test")
    assert server is not None
    port = server.server_address[1]
    socks = []
    try:
        for _ in range(metrics_http.MAX_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            socks.append(sock)
        for _ in range(metrics_http.MAX_CLIENTS):
            assert rendering.acquire(timeout=5)  # every slot is answering
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert extra.recv(100) == b""  # closed unanswered
        extra.close()
        assert (server.refused, server.evicted) == (1, 0)  # type: ignore[attr-defined]
        gate.set()
        for sock in socks:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.0 200 OK") and answer.endswith(b"# EOF\n")
    finally:
        gate.set()
        for sock in socks:
            sock.close()
        stop(server)


def test_an_evicted_connection_slower_than_the_evict_wait_gets_the_new_one_refused_not_a_stall(monkeypatch):
    """Past EVICT_WAIT_S: the connection closed to make room keeps its slot longer than the new
    one waits for it (its thread not scheduled, say). The new connection is closed unanswered and
    counted, after about EVICT_WAIT_S and not while the serving loop blocks; the late slot is
    given back, not lost, and the next scrape is served."""
    monkeypatch.setattr(metrics_http, "MAX_CLIENTS", 2)
    monkeypatch.setattr(metrics_http, "EVICT_WAIT_S", 0.3)
    stall, release = threading.Event(), threading.Event()
    handle = metrics_http._Handler.handle

    def slow_to_end(self):
        handle(self)
        if stall.is_set():  # evicted: its thread keeps the slot for longer than the wait
            release.wait(5)

    monkeypatch.setattr(metrics_http._Handler, "handle", slow_to_end)
    server = metrics_http.serve(metrics_http.new_registry(), "127.0.0.1", 0, "test")
    assert server is not None
    port = server.server_address[1]
    socks = []
    try:
        for _ in range(2):  # every slot held by a connection that sends nothing
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        _wait_for(lambda: len(server._waiting) == 2, "both slots held")  # type: ignore[attr-defined]
        stall.set()
        started = time.monotonic()
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert extra.recv(100) == b""  # closed unanswered
        waited = time.monotonic() - started
        extra.close()
        assert socks[0].recv(100) == b""  # the oldest was closed to make room (the fault)
        assert (server.refused, server.evicted) == (1, 0)  # type: ignore[attr-defined]
        assert 0.3 <= waited < 3, waited
        stall.clear()
        release.set()  # the evicted thread ends and gives its slot back
        _wait_for(lambda: server.slots._value == 1, "the late slot given back")  # type: ignore[attr-defined]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert body.endswith(b"# EOF\n")
        assert (server.refused, server.evicted) == (1, 0)  # type: ignore[attr-defined]  # the free slot
    finally:
        release.set()
        for sock in socks:
            sock.close()
        stop(server)


def test_a_collector_that_raises_gets_a_500_and_the_server_lives_on(caplog):
    registry = metrics_http.new_registry()
    broken = {"on": False}  # register() collects once to learn the names

    def families():
        if broken["on"]:
            raise RuntimeError("collector bug")
        return []

    registry.register(metrics_http.FunctionCollector(families))
    broken["on"] = True
    server = metrics_http.serve(registry, "127.0.0.1", 0, "test")
    assert server is not None
    port = server.server_address[1]
    try:
        with caplog.at_level(logging.ERROR):
            assert _exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 500")
        assert any("rendering the page failed" in r.getMessage() for r in caplog.records)
        broken["on"] = False
        assert _exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    finally:
        stop(server)


def test_the_agent_loads_no_http_stack_for_its_metrics():
    """The agent's imports as its entry point makes them: prometheus_client's package init stays
    deferred and none of the HTTP stack behind `exposition` is loaded (~3 MB of the agent's
    resident set, see metrics_http). A `from prometheus_client import X` anywhere fails this."""
    code = (
        "import sys\n"
        "from keplerlog import lazyinit\n"
        "import keplerlog.agent.main, keplerlog.agent.rdsender\n"
        "heavy = ('http.server', 'http.client', 'email', 'wsgiref', 'urllib.request')\n"
        "print(lazyinit.deferred('prometheus_client'), sorted(k for k in sys.modules if k in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True []", done.stdout + done.stderr

"""Consumer pieces without a broker: routing, names, layout, journal recovery, disk full."""

import errno
import json
import os
import threading
from collections import Counter, namedtuple
from zoneinfo import ZoneInfo

import pytest
from consumer_support import ANY_TIME

from keplerlog.consumer.config import ConfigError, load_config
from keplerlog.consumer.diskwait import wait_out_full_disk
from keplerlog.consumer.files import WRITE_PIECE, DiskFullError, FileCache, FileOps, pieces
from keplerlog.consumer.journal import Journal
from keplerlog.consumer.main import main
from keplerlog.consumer.metrics import Metrics, bucket_quantile
from keplerlog.consumer.route import Plan, Router
from keplerlog.consumer.sink import Sink, StateNotApplied
from keplerlog.layout import Layout, LayoutError
from keplerlog.names import name_problem
from keplerlog.paths import PathGuard, UnsafePathError
from keplerlog.record import Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
DAY1 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
TP = ("t", 0)


def batch(offset, value, ts=DAY1, service="shop", module="portal", file_id="f1"):
    return Batch(service, module, "h1", "/app/x.log", file_id, offset, value.count(b"\n"), ts)


def rec(kafka_offset, b, value):
    return Rec("t", 0, kafka_offset, DAY1, b.headers(), value)


def make_sink(root, ops=None, layout="{service}/{module}.{day}", tz="UTC", max_open=256, cid="unit"):
    router = Router(Layout(layout), ZoneInfo(tz), PathGuard(str(root)), ts_window=ANY_TIME)
    files = FileCache(str(root), max_open, 60, ops)
    return Sink(router, files, Journal(str(root), cid), Metrics())


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "",
        "a/b",
        "/abs",
        "a\\b",
        "a\x00b",
        "x\x1b[31m",
        "a\nb",
        ".hidden",
        "x" * 101,
        "\udcff",
        " lead",
        "_quarantine",
        "a\x85b",
    ],
)
def test_unsafe_names_rejected(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["portal", "shop-api_2", "é" * 50, "a.b", "x" * 100])
def test_safe_names_accepted(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "template",
    [
        "/{module}.{day}",
        "{module}",
        "../{module}.{day}",
        "{host}/{day}",
        ".x/{module}.{day}",
        "_quarantine/{day}",
        "a//{day}",
        "{module.x}{day}",
    ],
)
def test_bad_layouts(template):
    with pytest.raises(LayoutError):
        Layout(template)


def test_layout_regex_round_trip():
    layout = Layout("{service}/{module}.{day}")
    rx = layout.regex()
    match = rx.fullmatch(layout.render("shop", "por.tal", "20240102") + ".gz")
    assert match and match["day"] == "20240102" and match["ext"] == ".gz"
    assert not rx.fullmatch("shop/portal.2024010")
    assert not rx.fullmatch("shop/.x.20240102")
    assert not rx.fullmatch("a/b/portal.20240102")


def test_path_guard(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(tmp_path)
    guard = PathGuard(str(root))
    guard.check("shop/portal.20240101")
    for bad in ["../x", "/etc/passwd", "evil/x", "a/../../x"]:
        with pytest.raises(UnsafePathError):
            guard.check(bad)


def test_route_day_split_dedup_overlap_gap(tmp_path):
    router = Router(Layout("{module}.{day}"), ZoneInfo("UTC"), PathGuard(str(tmp_path)))
    files, plan = {}, Plan()
    a = b"l1\nl2\n"
    router.route(rec(0, batch(0, a), a), files, plan, DAY1)
    router.route(rec(1, batch(0, a), a), files, plan, DAY1)  # replay
    b = b"l2\nl3\n"
    router.route(rec(2, batch(3, b), b), files, plan, DAY1)  # overlap
    c = b"l9\n"
    router.route(rec(3, batch(20, c, ts=DAY1 + 86_400_000), c), files, plan, DAY1)  # gap, next day
    assert plan.chunks == {"portal.20231114": [a, b"l3\n"], "portal.20231115": [c]}
    assert plan.counts["duplicate_records"] == 1 and plan.counts["partial_overlaps"] == 1
    assert plan.counts["gaps"] == 1 and plan.counts["gap_bytes"] == 11
    assert files["shop\x1fh1\x1ff1"][1:] == [0, 9, 20, 23]  # written ranges; the hole stays open


def test_route_timezone(tmp_path):
    router = Router(Layout("{module}.{day}"), ZoneInfo("Asia/Tokyo"), PathGuard(str(tmp_path)))
    plan = Plan()
    router.route(rec(0, batch(0, b"x\n"), b"x\n"), {}, plan, DAY1)  # 07:13 next day in Tokyo
    assert list(plan.chunks) == ["portal.20231115"]


def test_route_legacy_and_garbage(tmp_path):
    router = Router(Layout("{service}/{module}.{day}"), ZoneInfo("UTC"), PathGuard(str(tmp_path)))
    plan = Plan()
    router.route(Rec("t", 0, 0, DAY1, [], b"web##$$##hello\napi##$$##x##$$##y\nplain\n"), {}, plan, DAY1)
    router.route(Rec("t", 0, 1, None, None, b"web##$$##one"), {}, plan, DAY1)
    router.route(Rec("t", 0, 2, DAY1, [], b"\xff\xfegarbage"), {}, plan, DAY1)
    router.route(Rec("t", 0, 3, DAY1, [("kl.v", b"2")], b"v2\n"), {}, plan, DAY1)
    bad = batch(0, b"x\n").headers()
    bad = [(k, b"NaN" if k == "kl.offset" else v) for k, v in bad]
    router.route(Rec("t", 0, 4, DAY1, bad, b"x\n"), {}, plan, DAY1)
    router.route(Rec("t", 0, 5, DAY1, batch(0, b"x\n", module="../../etc").headers(), b"x\n"), {}, plan, DAY1)
    huge_ts = [("kl.v", b"1"), *batch(0, b"").headers()[1:-1], ("kl.ts", b"99999999999999999999")]
    router.route(Rec("t", 0, 6, DAY1, huge_ts, b"x\n"), {}, plan, DAY1)
    assert plan.chunks["legacy/web.20231114"] == [b"hello\n", b"one\n"]
    assert plan.chunks["legacy/api.20231114"] == [b"x##$$##y\n"]
    # As the Flume sink did: a line without a module prefix goes to the default module.
    assert plan.chunks["legacy/default.20231114"] == [b"plain\n", b"\xff\xfegarbage\n"]
    # A kl.ts far in the future is filed under the receive day, not quarantined.
    assert plan.chunks["shop/portal.20231114"] == [b"x\n"] and plan.counts["ts_out_of_range"] == 1
    quarantine = b"".join(plan.chunks["_quarantine/20231114"])
    assert quarantine.count(b"#kl-quarantine") == 3
    assert b"unknown format version 2" in quarantine and b"kl.offset is not an integer" in quarantine
    assert b"unsafe service/module" in quarantine
    assert plan.counts["quarantined"] == 3 and plan.counts["unsafe_names"] == 1


def test_sink_disk_full_rolls_back_and_retries(tmp_path):
    failing = {"left": 0}

    def write(fd, data):
        if failing["left"]:
            failing["left"] -= 1
            os.write(fd, bytes(data[: len(data) // 2]))  # a partial append, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    sink = make_sink(tmp_path, FileOps(write=write))
    first = b"a\n" * 10
    assert sink.write({TP: [rec(0, batch(0, first), first)]}) == {TP: 1}
    path = tmp_path / "shop" / "portal.20231114"
    second = b"b\n" * 10
    failing["left"] = 2
    for _ in range(2):
        with pytest.raises(DiskFullError):
            sink.write({TP: [rec(1, batch(20, second), second)]})
        assert path.read_bytes() == first  # rolled back
        assert sink.states[TP].next_offset == 1
        assert sink.journal.pending() is None
    assert sink.write({TP: [rec(1, batch(20, second), second)]}) == {TP: 2}
    assert path.read_bytes() == first + second


def test_pieces_keep_the_order_and_write_big_chunks_without_a_copy():
    big = [bytes([65 + i]) * (WRITE_PIECE + i) for i in range(3)]
    small = [b"%d\n" % i for i in range(40_000)]  # 40,000 one-line records: ~229 KB
    chunks = [small[0], big[0], big[1], *small[1:20_000], big[2], *small[20_000:]]
    out = list(pieces(chunks))
    assert b"".join(out) == b"".join(chunks)
    assert [p for p in out if any(p is b for b in big)] == big  # the same objects: not copied
    is_big = [any(p is b for b in big) for p in out]
    # the small ones are joined into pieces of at least WRITE_PIECE, except where a big chunk or
    # the end cuts a run short: 1 alone before big[0], 2 + 2 pieces of the two runs after it
    assert len(out) == 3 + 5
    for i in range(len(out) - 1):
        if not is_big[i] and not is_big[i + 1]:
            assert len(out[i]) >= WRITE_PIECE
    assert list(pieces([])) == [] and list(pieces([b"x\n"])) == [b"x\n"]


def test_sink_disk_full_after_some_pieces_rolls_the_whole_append_back(tmp_path):
    """A batch of several big records to one file: the disk fills after the first piece."""
    calls = {"n": 0, "fail_at": 2}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            os.write(fd, bytes(data[:1000]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    sink = make_sink(tmp_path, FileOps(write=write))
    line = b"y" * 1023 + b"\n"
    values = [line * 80 for _ in range(3)]  # 80 KB records: each one piece, over WRITE_PIECE
    assert all(len(v) > WRITE_PIECE for v in values)
    recs, off = [], 0
    for i, value in enumerate(values):
        recs.append(rec(i, batch(off, value), value))
        off += len(value)
    with pytest.raises(DiskFullError):
        sink.write({TP: recs})
    assert calls["n"] == 2  # the fault came in the second piece, after a whole first one
    path = tmp_path / "shop" / "portal.20231114"
    assert path.read_bytes() == b""  # rolled back to the size before the batch
    assert sink.states[TP].next_offset is None  # nothing of the batch counts as written
    calls["fail_at"] = 0
    assert sink.write({TP: recs}) == {TP: 3}
    assert path.read_bytes() == b"".join(values)


def test_sink_fsync_enospc_rolls_back(tmp_path):
    state = {"fail": True}

    def fsync(fd):
        if state["fail"]:
            raise OSError(errno.EDQUOT, "quota")
        os.fsync(fd)

    sink = make_sink(tmp_path, FileOps(fsync=fsync))
    data = b"x\n"
    with pytest.raises(DiskFullError):
        sink.write({TP: [rec(0, batch(0, data), data)]})
    assert (tmp_path / "shop" / "portal.20231114").read_bytes() == b""
    state["fail"] = False
    sink.write({TP: [rec(0, batch(0, data), data)]})
    assert (tmp_path / "shop" / "portal.20231114").read_bytes() == data


def test_journal_recovery_rollback_and_roll_forward(tmp_path):
    sink = make_sink(tmp_path)
    data = b"x\n" * 5
    sink.write({TP: [rec(0, batch(0, data), data)]})
    state = sink.states[TP]
    sink.revoke([TP])  # a rebalance: the partition moves to `other` below
    target = tmp_path / "shop" / "portal.20231114"
    # A dead consumer appended 4 bytes after recording its intent, then died (no lock held).
    dead = Journal(str(tmp_path), "dead")
    dead.begin({"shop/portal.20231114": (len(data), 4)})
    with target.open("ab") as f:
        f.write(b"y\ny\n")
    dead.close()
    other = make_sink(tmp_path, cid="other")
    assert other.assign([TP]) == {TP: 1}
    assert target.read_bytes() == data
    # Roll forward: committed intent whose states were not applied yet.
    dead2 = Journal(str(tmp_path), "dead2")
    state.next_offset = 7
    dead2.commit({}, {"t-partition-0.json": state})
    dead2.close()
    assert other.assign([TP]) == {TP: 7}
    # A live consumer's intent is left alone.
    live = Journal(str(tmp_path), "live")
    live.begin({"shop/portal.20231114": (0, 10)})
    other.assign([TP])
    assert target.read_bytes() == data and live.pending() == "write"
    assert (tmp_path / ".keplerlog/state/live.intent.0").exists()


def test_written_counters_past_the_label_cap_and_the_latency_samples_past_their_cap(tmp_path, monkeypatch):
    """More day files than the router remembers labels for (cap 2 here, 5 modules): each batch's
    bytes and lines are still counted for the right service and module; a batch of 1,000 records
    costs at most LATENCY_SAMPLES_PER_BATCH latency observations."""
    from keplerlog.consumer import metrics as metrics_mod
    from keplerlog.consumer import route as route_mod

    monkeypatch.setattr(route_mod, "LABELS_CAP", 2)
    sink = make_sink(tmp_path)
    recs = [rec(i, batch(0, b"x\ny\n", module=f"m{i}", file_id=f"f{i}"), b"x\ny\n") for i in range(5)]
    sink.write({TP: recs})
    assert len(sink.router.labels) <= 2
    assert dict(sink.metrics.written_bytes) == {("shop", f"m{i}"): 4 for i in range(5)}
    assert dict(sink.metrics.written_lines) == {("shop", f"m{i}"): 2 for i in range(5)}
    m = Metrics()
    m.observe_latency(10_000, [9_000] * 1_000)
    count = [s.value for f in m.latency.collect() for s in f.samples if s.name.endswith("_count")]
    assert 0 < count[0] <= metrics_mod.LATENCY_SAMPLES_PER_BATCH and len(count) == 1


def test_written_lines_take_a_whole_records_kl_lines_and_count_the_rest(tmp_path, monkeypatch):
    """A record written whole is not counted again: its kl.lines is the agent's count. A value
    the consumer changed (joined with a held line end, cut before an incomplete end), or a count
    that cannot be true (0, or more lines than bytes), is counted."""
    from keplerlog import newlines
    from keplerlog.consumer import route as route_mod

    counted: list[bytes] = []
    real = newlines.count

    def counting(buf, start=0, end=None):
        counted.append(bytes(buf))
        return real(buf, start, end)

    monkeypatch.setattr(route_mod.newlines, "count", counting)
    sink = make_sink(tmp_path)

    def lines_written(recs):
        before = sum(sink.metrics.written_lines.values())
        counted.clear()
        sink.write({TP: recs})
        return sum(sink.metrics.written_lines.values()) - before

    whole = b"a\nb\nc\n"
    assert lines_written([rec(0, batch(0, whole), whole)]) == 3
    assert counted == []  # taken from kl.lines
    # kl.lines is trusted for a whole record: a count that differs from the bytes shows it
    told = Batch("shop", "portal", "h1", "/app/x.log", "f1", 6, 1, DAY1)
    assert lines_written([rec(1, told, whole)]) == 1 and counted == []
    # impossible counts are not used
    for n, (lines, value) in enumerate([(0, b"d\n"), (99, b"e\nf\n")]):
        b = Batch("shop", "portal", "h1", "/app/x.log", "f1", 12 + 2 * n, lines, DAY1)
        assert lines_written([rec(2 + n, b, value)]) == value.count(b"\n")
        assert counted == [value]
    # an incomplete end is held; the record that ends it is joined with it: both counted
    head, rest = b"g\nh", b"i\nj\n"
    assert lines_written([rec(4, batch(18, head), head)]) == 1 and counted == [b"g\n"]
    assert lines_written([rec(5, batch(21, rest), rest)]) == 2 and counted == [b"hi\nj\n"]
    text = (tmp_path / "shop" / "portal.20231114").read_bytes()
    assert text == whole * 2 + b"d\ne\nf\ng\nhi\nj\n"


def test_bounded_open_files(tmp_path):
    sink = make_sink(tmp_path, max_open=2)
    recs = [rec(i, batch(0, b"x\n", module=f"m{i}", file_id=f"f{i}"), b"x\n") for i in range(5)]
    sink.write({TP: recs})
    assert len(sink.files) <= 2
    assert sorted(p.name for p in (tmp_path / "shop").iterdir()) == [f"m{i}.20231114" for i in range(5)]


def test_metrics_render(tmp_path):
    m = Metrics(str(tmp_path), "g1")
    m.inc("records", 3)
    m.observe_latency(10_000, [9_000, 9_500, 8_000])
    m.add(Counter(), None, {("shop", "portal"): (12, 3)})
    m.set_lag({("logs", 2): 40})
    text = m.render()
    assert "keplerlog_consumer_records_total 3.0" in text
    assert 'keplerlog_consumer_latency_seconds_bucket{le="0.5"} 1.0' in text
    assert 'keplerlog_consumer_latency_seconds_bucket{le="2.0"} 3.0' in text
    assert 'keplerlog_consumer_written_bytes_total{module="portal",service="shop"} 12.0' in text
    assert 'keplerlog_consumer_written_lines_total{module="portal",service="shop"} 3.0' in text
    assert 'keplerlog_consumer_lag_records{partition="2",topic="logs"} 40.0' in text
    assert "keplerlog_consumer_data_root_free_bytes " in text
    assert 'keplerlog_consumer_info{group="g1",version="' in text
    assert "process_open_fds" in text


def test_log_line_quantiles_cover_the_last_interval_only():
    """A start-up backlog (30 s old lines) must not stay in the p99 of later log lines."""
    m = Metrics()
    m.observe_latency(40_000, [10_000] * 100)
    first = m.interval_quantiles()
    assert 16 < first["0.99"] <= 32
    m.observe_latency(40_400, [40_000] * 100)
    second = m.interval_quantiles()
    assert 0.25 < second["0.99"] <= 0.5 and 0.25 < second["0.5"] <= 0.5
    assert m.interval_quantiles() == {}


def test_bucket_quantile_matches_histogram_quantile():
    # PromQL: histogram_quantile(0.5, ...) over buckets 1:10, 2:30, +Inf:40 -> 1 + (20-10)/(30-10) = 1.5
    assert bucket_quantile(0.5, [(1.0, 10), (2.0, 30), (float("inf"), 40)]) == 1.5
    assert bucket_quantile(0.99, [(1.0, 10), (2.0, 30), (float("inf"), 40)]) == 2.0
    assert bucket_quantile(0.5, [(1.0, 0), (float("inf"), 0)]) is None


def test_config_env_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text("kafka: {bootstrap_servers: 'k:9092'}\nroot: /srv/x\nlayout: '{module}.{day}'\n")
    conf = load_config(str(cfg), {"KEPLERLOG_TOPIC": "t2", "KEPLERLOG_ROOT": "/srv/y"})
    assert (conf.topic, conf.root, conf.layout.template) == ("t2", "/srv/y", "{module}.{day}")
    for text in [
        "root: rel\nkafka: {bootstrap_servers: k}\n",
        "kafka: {bootstrap_servers: k}\nroot: /x\ntimezone: Mars/X\n",
        "kafka: {bootstrap_servers: k}\nroot: /x\nbogus: 1\n",
        "kafka: [\n",
        "kafka: {bootstrap_servers: k}\nroot: /x\nlayout: '../{day}'\n",
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError):
            load_config(str(cfg), {})
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keplerlog-consumer: config error: layout")


def test_fetch_max_wait_ms_defaults_to_100_and_is_checked(tmp_path):
    """The broker's hold on a fetch that finds nothing (see config.py: it bounds how long a
    partition left out of the in-flight fetch waits); kafka-python's own 500 ms is not used."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("kafka: {bootstrap_servers: 'k:9092'}\nroot: /srv/x\n")
    assert load_config(str(cfg), {}).fetch_max_wait_ms == 100
    cfg.write_text("kafka: {bootstrap_servers: 'k:9092', fetch_max_wait_ms: 20}\nroot: /srv/x\n")
    assert load_config(str(cfg), {}).fetch_max_wait_ms == 20
    for bad in ("0", "10001", "'soon'"):
        cfg.write_text(f"kafka: {{bootstrap_servers: 'k:9092', fetch_max_wait_ms: {bad}}}\nroot: /srv/x\n")
        with pytest.raises(ConfigError, match=r"kafka\.fetch_max_wait_ms"):
            load_config(str(cfg), {})


def test_state_file_is_json(tmp_path):
    sink = make_sink(tmp_path)
    sink.write({TP: [rec(4, batch(0, b"x\n"), b"x\n")]})
    state = json.loads((tmp_path / ".keplerlog/state/t-partition-0.json").read_text())
    assert state["next_offset"] == 5 and state["files"]["shop\x1fh1\x1ff1"][1:] == [0, 2]


def _socket_transport():
    """A connected socket pair and a stand-in transport reading the non-blocking end."""
    import socket
    from types import SimpleNamespace

    left, right = socket.socketpair()
    right.setblocking(False)
    return left, right, SimpleNamespace(_sock=right)


def test_response_reads_copy_once_and_give_kafka_pythons_bytes():
    """netfix: KafkaBytes.read through a memoryview returns what kafka-python's own returns,
    moves the read position alike (past the end, nothing, negative), and is installed."""
    import random

    from kafka.protocol.frame import KafkaBytes

    from keplerlog.consumer import netfix

    assert netfix.apply()
    assert KafkaBytes.read is netfix._read_once
    theirs = netfix.REPLACED["KafkaBytes.read"]
    assert theirs is not netfix._read_once
    rng = random.Random(7)
    for size in (0, 1, 4, 4096, 70_000):
        patterns = ([None], [1, None], [3, 3, 100, None], [0, 2, None], [size + 10], [size, 1], [5, -2, 4])
        for reads in patterns:
            data = rng.randbytes(size)
            a, b = KafkaBytes(size), KafkaBytes(size)
            a[:], b[:] = data, data
            want = [theirs(a) if n is None else theirs(a, n) for n in reads]
            got = [netfix._read_once(b) if n is None else netfix._read_once(b, n) for n in reads]
            assert got == want and a.tell() == b.tell(), (size, reads)
            assert all(type(x) is bytes for x in got)
            b.extend(b"x")  # the memoryview was released: the buffer can still be resized


def test_large_socket_reads_same_bytes_and_errors():
    """netfix: 1 MiB recv() per call returns exactly what was sent, and reports a closed peer."""
    import threading

    from keplerlog.consumer import netfix

    assert netfix.apply() and netfix.apply() and netfix.applied()  # idempotent
    from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

    assert KafkaSSLTransport._sock_recv is not KafkaTCPTransport._sock_recv  # TLS keeps its own reads

    left, right, fake = _socket_transport()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    got = bytearray()
    sender = threading.Thread(target=left.sendall, args=(payload,))
    sender.start()
    while len(got) < len(payload):
        data, err = KafkaTCPTransport._sock_recv(fake)
        assert err is None
        got += data
    sender.join()
    assert bytes(got) == payload
    data, err = KafkaTCPTransport._sock_recv(fake)  # nothing there: would block, no error
    assert (data, err) == (b"", None)
    left.close()
    data, err = KafkaTCPTransport._sock_recv(fake)
    assert data == b"" and "disconnected" in str(err)
    right.close()


@pytest.mark.parametrize("transport_name", ["KafkaTCPTransport", "KafkaSSLTransport"])
def test_bytes_that_came_with_the_end_of_the_stream_are_delivered_first(transport_name):
    """netfix: a broker's last answer (a refused login) and its close read in one go: the answer
    is delivered, the end is reported by the next read (kafka-python dropped the answer)."""

    from kafka.net import transport

    from keplerlog.consumer import netfix

    assert netfix.apply()
    recv = getattr(transport, transport_name)._sock_recv

    left, right, fake = _socket_transport()
    left.sendall(b"the broker's answer")
    left.close()  # answer and end of stream are both there before the first read
    assert recv(fake) == (b"the broker's answer", None)
    data, err = recv(fake)
    assert data == b"" and "disconnected" in str(err)
    right.close()


def test_favor_io_thread_only_lowers_the_switch_interval():
    import sys

    from keplerlog.consumer import netfix

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        netfix.favor_io_thread()
        assert sys.getswitchinterval() == pytest.approx(netfix.SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0001)
        netfix.favor_io_thread()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


def test_merge_keeps_older_records_first():
    from keplerlog.consumer.app import _merge

    failed = {TP: [1, 2], ("t", 1): [5]}
    later = {TP: [3], ("t", 2): [9]}
    merged = _merge(failed, later)
    assert merged == {TP: [1, 2, 3], ("t", 1): [5], ("t", 2): [9]}
    assert failed == {TP: [1, 2], ("t", 1): [5]}  # inputs untouched


def test_enospc_saving_the_state_of_a_duplicate_only_batch_is_disk_full(tmp_path, monkeypatch):
    """A batch with nothing to append still saves state: a full disk there must back off too."""
    sink = make_sink(tmp_path)
    data = b"x\n"
    sink.write({TP: [rec(0, batch(0, data), data)]})
    real = sink.journal.save_states

    def full(states):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink.journal, "save_states", full)
    with pytest.raises(DiskFullError):
        sink.write({TP: [rec(1, batch(0, data), data)]})  # a replay: duplicate only
    assert sink.states[TP].next_offset == 1  # unchanged, so the retry is the same batch
    monkeypatch.setattr(sink.journal, "save_states", real)
    assert sink.write({TP: [rec(1, batch(0, data), data)]}) == {TP: 2}
    assert sink.metrics.counts["duplicate_records"] == 1


def test_a_full_disk_after_the_commit_holds_the_state_back_and_never_writes_the_batch_again(
    tmp_path, monkeypatch
):
    """ENOSPC when the state files of a committed (durable) batch are written: the batch is not
    written again, and its state and offsets wait for apply_pending() (a crash meanwhile: the
    committed intent is rolled forward). The old sink retried in its thread, unseen (no
    disk-full error, no pause)."""
    sink = make_sink(tmp_path)
    first, second, third = b"a\n" * 3, b"b\n" * 3, b"c\n" * 3
    sink.write({TP: [rec(0, batch(0, first), first)]})
    real = sink.journal.save_states
    refused = {"n": 0}

    def full(states):
        refused["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink.journal, "save_states", full)
    with pytest.raises(StateNotApplied):
        sink.write({TP: [rec(1, batch(6, second), second)]})
    path = tmp_path / "shop" / "portal.20231114"
    assert path.read_bytes() == first + second  # durable at once
    assert sink.journal.pending() == "commit"  # what recovery rolls forward
    assert sink.states[TP].next_offset == 1  # the memory follows the state files
    for _ in range(3):  # past the first refusal: it stays pending as long as the disk is full
        with pytest.raises(StateNotApplied):
            sink.apply_pending()
    with pytest.raises(DiskFullError) as refused_next:  # a next batch waits, not written yet
        sink.write({TP: [rec(2, batch(12, third), third)]})
    assert not isinstance(refused_next.value, StateNotApplied)  # it is not durable: retried whole
    assert refused["n"] == 5 and path.read_bytes() == first + second

    monkeypatch.setattr(sink.journal, "save_states", real)
    assert sink.apply_pending() == {TP: 2}
    assert sink.unapplied is None and sink.states[TP].next_offset == 2
    assert sink.apply_pending() == {}
    assert sink.write({TP: [rec(2, batch(12, third), third)]}) == {TP: 3}
    assert path.read_bytes() == first + second + third  # each batch once
    assert sink.metrics.counts["duplicate_records"] == 0


def test_a_write_first_applies_a_state_held_back_and_returns_both_offsets(tmp_path, monkeypatch):
    sink = make_sink(tmp_path)
    real = sink.journal.save_states
    calls = {"n": 0}

    def once_full(states):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real(states)

    monkeypatch.setattr(sink.journal, "save_states", once_full)
    first, second = b"a\n", b"b\n"
    with pytest.raises(StateNotApplied):
        sink.write({TP: [rec(0, batch(0, first), first)]})
    other = ("t", 1)
    b = batch(0, second, file_id="f9")
    assert sink.write({other: [Rec("t", 1, 0, DAY1, b.headers(), second)]}) == {TP: 1, other: 1}
    assert (tmp_path / "shop" / "portal.20231114").read_bytes() == first + second


def full_when_saving_state(sink, monkeypatch):
    """Make the sink's state files fail with ENOSPC; returns a function that frees the disk."""
    real = sink.journal.save_states

    def full(states):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink.journal, "save_states", full)
    return lambda: monkeypatch.setattr(sink.journal, "save_states", real)


def test_a_partition_whose_state_waits_stays_locked_and_its_next_owner_rolls_it_forward(
    tmp_path, monkeypatch
):
    """Stopping on a full disk with a written batch's state not saved: the partition is given up
    (revoke) but its lock is kept until the process exits, and the next owner, which waits for
    that lock, recovers the committed intent before reading the state: it resumes after the batch
    instead of appending it again. A next owner that recovered before taking the lock found the
    old owner alive, left its intent alone and resumed from the stale state."""
    old = make_sink(tmp_path, cid="old")
    first, second = b"a\n", b"b\n"
    old.write({TP: [rec(0, batch(0, first), first)], ("t", 1): []})
    full_when_saving_state(old, monkeypatch)
    with pytest.raises(StateNotApplied):
        old.write({TP: [rec(1, batch(2, second), second)]})
    other = ("t", 1)
    assert old.journal.locks.try_partition(*other)
    old.revoke([TP, other])
    new = make_sink(tmp_path, cid="new")
    assert not new.journal.locks.try_partition(*TP)  # kept: its state still waits
    assert new.journal.locks.try_partition(*other)  # released as usual
    new.journal.locks.release_partition(*other)

    resumed = {}
    taker = threading.Thread(target=lambda: resumed.update(new.assign([TP])))
    taker.start()
    taker.join(0.5)
    assert taker.is_alive()  # waits for the old owner
    old.journal.close()  # the old process exits
    taker.join(10)
    assert resumed == {TP: 2}  # after the written batch: rolled forward, not read again
    assert new.metrics.counts["recovered_intents"] == 1
    assert (tmp_path / "shop" / "portal.20231114").read_bytes() == first + second


def test_recovery_waits_out_a_full_disk_instead_of_crashing():
    """At start (and in assign), rolling a dead consumer's intent forward writes state files."""
    metrics = Metrics()
    calls = {"n": 0}
    slept: list[float] = []

    def recover():
        calls["n"] += 1
        if calls["n"] <= 8:
            assert calls["n"] == 1 or metrics.gauges["disk_full_paused"] == 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return ["rolled forward"]

    assert wait_out_full_disk(recover, metrics, "recovering", 1.0, sleep=slept.append) == ["rolled forward"]
    assert metrics.counts["disk_full"] == 8 and metrics.gauges["disk_full_paused"] == 0
    # doubling from 0.1 s, then held at the cap: past it the waits never grow
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])

    def broken():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):  # anything else is not waited out
        wait_out_full_disk(broken, metrics, "recovering", 1.0, sleep=slept.append)


def test_a_stop_ends_the_wait_for_disk_space():
    """A rebalance callback waits for the disk; a SIGTERM must end that wait (None: not done)."""
    metrics = Metrics()
    tries: list[int] = []
    stop = {"now": False}

    def refused():
        tries.append(1)
        stop["now"] = len(tries) == 3
        raise DiskFullError(errno.ENOSPC, "No space left on device")

    assert (
        wait_out_full_disk(refused, metrics, "x", 10.0, sleep=lambda s: None, stopping=lambda: stop["now"])
        is None
    )
    assert len(tries) == 3 and metrics.counts["disk_full"] == 3
    assert metrics.gauges["disk_full_paused"] == 1  # still full: the gauge keeps saying so


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_directory_swapped_for_a_symlink_after_the_check_is_not_followed(tmp_path, target):
    """The guard said "ok" for shop/ once; then shop/ became a symlink (out of root, or onto
    another service's directory): the next open refuses it and the records go to quarantine."""
    root = tmp_path / "root"
    root.mkdir()
    sink = make_sink(root)
    data = b"x\n"
    sink.write({TP: [rec(0, batch(0, data), data)]})
    sink.files.close_all()  # as after idle_close_s: the next write opens the path again
    dest = tmp_path / "outside" if target == "outside" else root / "other"
    dest.mkdir()
    (root / "shop").rename(tmp_path / "moved")
    (root / "shop").symlink_to(dest)
    more = b"y\n"
    assert sink.write({TP: [rec(1, batch(2, more), more)]}) == {TP: 2}
    assert list(dest.iterdir()) == []  # nothing written through the link
    quarantine = (root / "_quarantine").glob("*")
    (qfile,) = quarantine
    assert b"is a symlink" in qfile.read_bytes() and qfile.read_bytes().endswith(b"\ny\n\n")
    assert sink.metrics.counts["quarantined"] == 1

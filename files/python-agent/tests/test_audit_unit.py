"""The completeness audit without a broker: reconciliation, day windows, state, reports, the CLI.

Each test states the true loss it builds (records left out, holes, lost ranges) and checks that
the report and the audit say exactly that.
"""

from __future__ import annotations

import errno
import json
import os
from collections import Counter, namedtuple
from zoneinfo import ZoneInfo

import pytest
from consumer_support import ANY_TIME, die

from keplerlog.audit import main as audit_main
from keplerlog.audit.load import LoadError, load_day
from keplerlog.audit.report import Report, Row, parse, report_rel
from keplerlog.audit.summary import summarize
from keplerlog.consumer import coverage, marks, reports, spans
from keplerlog.consumer.files import DiskFullError, FileCache, FileOps
from keplerlog.consumer.journal import Journal, PartitionState
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Plan, Router
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.record import Batch, Watermark

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
DAY1 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
DAY2 = DAY1 + 86_400_000  # 2023-11-15
TP = ("t", 0)
KEY = "shop\x1fh1\x1ff1"


def make_router(root, layout="{service}/{module}.{day}", tz="UTC"):
    return Router(Layout(layout), ZoneInfo(tz), PathGuard(str(root)), ts_window=ANY_TIME)


def make_sink(root, cid="unit", ops=None, **kw):
    return Sink(
        make_router(root),
        FileCache(str(root), 64, 60, ops),
        Journal(str(root), cid),
        Metrics(),
        **({"report_interval_s": 0} | kw),
    )


def lines(n, start=0, width=10):
    """n lines of `width` bytes each (newline included), numbered from `start`."""
    return [f"{i:0{width - 1}d}\n".encode() for i in range(start, start + n)]


def data_records(
    values, first_kafka=0, offset=0, file_id="f1", host="h1", ts=DAY1, module="portal", partition=0
):
    out = []
    for n, value in enumerate(values):
        b = Batch("shop", module, host, f"/app/{module}.log", file_id, offset, value.count(b"\n"), ts)
        out.append(Rec("t", partition, first_kafka + n, ts, b.headers(), value))
        offset += len(value)
    return out


def wm(
    kafka_offset, acked, ts=DAY1, first=0, seen=None, state="open", lost=(), file_id="f1", host="h1", **kw
):
    fields = {"service": "shop", "module": "portal", "path": "/app/portal.log"} | kw
    mark = Watermark(
        host=host,
        file_id=file_id,
        ts_ms=ts,
        first=first,
        seen=acked if seen is None else seen,
        acked=acked,
        state=state,
        lost=tuple(lost),
        **fields,
    )
    return Rec("t", 0, kafka_offset, ts + 5, mark.headers(), mark.value())


def report(root, day="20231114", topic="t", partition=0):
    return json.loads((root / report_rel(day, topic, partition)).read_bytes())


def day_files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".keplerlog" not in p.parts
    }


# -- spans -----------------------------------------------------------------------------------


def test_span_arithmetic():
    assert spans.uncovered(0, 100, [10, 20, 30, 40]) == [(0, 10), (20, 30), (40, 100)]
    assert spans.uncovered(15, 35, [10, 20, 30, 40]) == [(20, 30)]
    assert spans.uncovered(0, 10, []) == [(0, 10)]
    assert spans.union([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert spans.minus([(0, 10), (20, 30)], 5, 25) == [(0, 5), (25, 30)]
    assert spans.clip([(0, 10), (20, 30)], 5, 25) == [(5, 10), (20, 25)]
    assert spans.holes([0, 10, 20, 30, 35, 40]) == [(10, 20), (30, 35)]


def test_given_up_holes_are_found_exactly():
    """70 records with a 1-byte hole before each: coverage gives up the lowest holes (as written)."""
    counts: Counter[str] = Counter()
    entry, gone = None, []
    for i in range(70):
        old = entry
        entry = coverage.decide(entry, i * 10, i * 10 + 9, DAY1, counts).entry
        if old is not None:
            gone += spans.given_up(old[1:], entry[1:], i * 10, i * 10 + 9)
    assert counts["gaps_given_up"] == 6
    assert gone == [(9, 10), (19, 20), (29, 30), (39, 40), (49, 50), (59, 60)]  # the six lowest holes


# -- routing and reconciliation --------------------------------------------------------------


def test_clean_file_is_complete_and_the_watermark_is_never_written(tmp_path):
    values = lines(5)
    sink = make_sink(tmp_path)
    sink.write({TP: [*data_records(values), wm(5, acked=50)]})
    assert day_files(tmp_path) == {"shop/portal.20231114": b"".join(values)}
    (row,) = report(tmp_path)["sources"]
    assert (row["shipped"], row["stored"], row["missing"], row["missing_bytes"]) == (50, 50, [], 0)
    assert row["incomplete_since_ms"] is None and row["window_start"] == 0
    assert sink.metrics.counts["watermarks"] == 1 and sink.metrics.counts["quarantined"] == 0
    assert (
        'keplerlog_consumer_audit_missing_bytes{module="portal",service="shop"} 0.0' in sink.metrics.render()
    )


def test_records_that_never_arrived_are_missing_at_their_ranges(tmp_path):
    values = lines(10)
    recs = data_records(values)
    kept = [r for n, r in enumerate(recs) if n not in (0, 3, 4, 9)]  # lost: [0,10) [30,50) [90,100)
    sink = make_sink(tmp_path)
    sink.write({TP: [*kept, wm(10, acked=100)]})
    (row,) = report(tmp_path)["sources"]
    assert row["missing"] == [[0, 10], [30, 50], [90, 100]]
    assert (row["missing_bytes"], row["stored"], row["shipped"]) == (40, 60, 100)
    assert row["incomplete_since_ms"] == DAY1 + 5  # the watermark record's Kafka time
    text = sink.metrics.render()
    assert 'keplerlog_consumer_audit_missing_bytes{module="portal",service="shop"} 40.0' in text
    assert 'keplerlog_consumer_audit_files_incomplete{module="portal",service="shop"} 1.0' in text


def test_a_late_resend_completes_the_file(tmp_path):
    recs = data_records(lines(4))
    sink = make_sink(tmp_path)
    sink.write({TP: [recs[0], recs[2], recs[3], wm(3, acked=40)]})
    assert report(tmp_path)["sources"][0]["missing"] == [[10, 20]]
    sink.write({TP: [recs[1]._replace(offset=4), wm(5, acked=40)]})
    (row,) = report(tmp_path)["sources"]
    assert row["missing_bytes"] == 0 and row["incomplete_since_ms"] is None
    assert (
        'keplerlog_consumer_audit_files_incomplete{module="portal",service="shop"} 0.0'
        in sink.metrics.render()
    )


def test_a_held_line_end_is_pending_not_missing(tmp_path):
    sink = make_sink(tmp_path)
    recs = data_records([b"whole line\nhalf a li"])  # 20 bytes, the last 9 held
    sink.write({TP: [*recs, wm(1, acked=20)]})
    (row,) = report(tmp_path)["sources"]
    assert row["missing_bytes"] == 0 and row["stored"] == 20
    assert day_files(tmp_path) == {"shop/portal.20231114": b"whole line\n"}
    assert sink.holds[TP][KEY].start == 11  # the fault: really held, not written


def test_given_up_holes_stay_missing_and_spans_past_the_cap_are_counted(tmp_path):
    """70 records of 9 bytes, each followed by a 1-byte hole: past 64 ranges coverage treats the
    lowest holes as written; the audit still counts all 69, and lists the highest 64."""
    recs = [data_records([b"x" * 8 + b"\n"], first_kafka=i + 1, offset=i * 10)[0] for i in range(70)]
    sink = make_sink(tmp_path)
    sink.write({TP: [recs[0], wm(0, acked=9)]})  # a mark exists before the holes are given up
    sink.write({TP: [*recs[1:], wm(71, acked=699)]})
    assert sink.metrics.counts["gaps_given_up"] == 6  # the fault happened
    (mark,) = sink.states[TP].marks.values()
    assert mark.given_up == tuple((i * 10 + 9, i * 10 + 10) for i in range(6))
    (row,) = report(tmp_path)["sources"]
    assert row["missing_bytes"] == 69 and row["stored"] == 699 - 69
    assert row["missing"] == [[i * 10 + 9, i * 10 + 10] for i in range(5, 69)]


def test_holes_given_up_before_the_first_watermark_are_not_known(tmp_path):
    """The documented limit: with no mark yet, coverage's give-ups look written to the audit."""
    recs = data_records(lines(200))
    sink = make_sink(tmp_path)
    sink.write({TP: recs[1::2]})  # every other record: 100 holes of 10 bytes
    sink.write({TP: [wm(1000, acked=2000)]})
    given_up = sink.metrics.counts["gap_bytes_given_up"]
    (row,) = report(tmp_path)["sources"]
    assert given_up == 360 and row["missing_bytes"] == 1000 - given_up and len(row["missing"]) == 64


def test_lost_at_source_is_reported_once_per_day(tmp_path):
    sink = make_sink(tmp_path)
    recs = data_records(lines(7))
    sink.write({TP: [*recs, wm(7, acked=70, seen=90, state="gone", lost=[(70, 90, "truncated")])]})
    (row,) = report(tmp_path)["sources"]
    assert (row["lost"], row["lost_bytes"], row["missing_bytes"]) == ([[70, 90, "truncated"]], 20, 0)
    assert (
        'keplerlog_consumer_audit_source_lost_bytes{module="portal",service="shop"} 20.0'
        in sink.metrics.render()
    )
    # the next day the agent still reports the same range: not counted again
    sink.write(
        {
            TP: [
                wm(
                    8,
                    acked=70,
                    seen=120,
                    ts=DAY2,
                    state="gone",
                    lost=[(70, 90, "truncated"), (90, 120, "deleted")],
                )
            ]
        }
    )
    (row2,) = report(tmp_path, "20231115")["sources"]
    assert (row2["lost"], row2["lost_bytes"], row2["shipped"]) == ([[90, 120, "deleted"]], 30, 0)


def test_day_windows_and_yesterdays_report_rewritten_after_midnight(tmp_path):
    """File f1 moves on to day 2; a late day-1 watermark of f2 rewrites day 1's report: f1 stays."""
    sink = make_sink(tmp_path)
    a = data_records(lines(6))
    b = data_records(lines(3), first_kafka=100, file_id="f2")
    sink.write({TP: [*a[:4], wm(4, acked=40), b[0], wm(101, acked=10, file_id="f2")]})
    sink.write({TP: [*a[4:], wm(10, acked=60, ts=DAY2)]})
    (d2,) = report(tmp_path, "20231115")["sources"]
    assert (d2["window_start"], d2["shipped"], d2["stored"]) == (40, 20, 20)
    sink.write({TP: [*b[1:], wm(102, acked=30, file_id="f2", ts=DAY1 + 1000)]})
    d1 = {r["file_id"]: r for r in report(tmp_path)["sources"]}
    assert (d1["f1"]["acked"], d1["f1"]["shipped"]) == (40, 40)  # f1's day-1 account, kept
    assert (d1["f2"]["acked"], d1["f2"]["shipped"]) == (30, 30)
    # an agent clock that goes back a day stays on the mark's day
    sink.write({TP: [wm(11, acked=60, ts=DAY1 + 2000)]})
    assert [r["window_start"] for r in report(tmp_path, "20231115")["sources"]] == [40]


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        (None, b"{not json", "watermark value is not JSON"),
        ({"kl.module": b"../x"}, None, "unsafe service/module: name starts with a dot"),
        ({"kl.service": b"a/b"}, None, "unsafe service/module"),
        ({"kl.path": b"/" * 5000}, None, "header kl.path longer than 4096 bytes"),
        ({"kl.ts": b"soon"}, None, "header kl.ts is not an integer"),
        (None, b"", "watermark value empty"),
        (None, b'{"first":5,"seen":9,"acked":4}', "watermark acked is below first"),
    ],
)
def test_malformed_or_hostile_watermarks_are_quarantined(tmp_path, headers, value, reason):
    good = wm(1, acked=10)
    hdrs = dict(good.headers) | (headers or {})
    bad = good._replace(headers=list(hdrs.items()), value=good.value if value is None else value)
    sink = make_sink(tmp_path)
    sink.write({TP: [*data_records(lines(1)), bad]})
    files = day_files(tmp_path)
    assert files.pop("shop/portal.20231114") == b"000000000\n"
    ((qname, qdata),) = files.items()
    assert qname.startswith("_quarantine/") and f'reason="{reason}'.encode() in qdata
    assert sink.metrics.counts["quarantined"] == 1 and sink.metrics.counts["watermarks"] == 0
    assert not (tmp_path / ".keplerlog/audit").exists()


def test_watermarks_alone_advance_the_state(tmp_path):
    sink = make_sink(tmp_path)
    assert sink.write({TP: [wm(0, acked=0), wm(1, acked=0)]}) == {TP: 2}
    assert Journal(str(tmp_path), "reader").load(*TP).next_offset == 2
    assert day_files(tmp_path) == {}
    (row,) = report(tmp_path)["sources"]
    assert row["shipped"] == 0


# -- state -----------------------------------------------------------------------------------


def test_marks_round_trip_and_old_or_damaged_state_loads(tmp_path):
    sink = make_sink(tmp_path)
    recs = data_records(lines(4))
    sink.write({TP: [recs[0], recs[2], wm(4, acked=40, seen=50, lost=[(40, 50, "rotated")])]})
    sink.write({TP: [wm(5, acked=40, ts=DAY2)]})
    state = sink.states[TP]
    (mark,) = state.marks.values()
    assert mark.prev is not None and mark.prev.day == "20231114" and mark.cur.day == "20231115"
    again = PartitionState.from_json(json.loads(state.dumps()))
    assert again == state
    assert PartitionState.from_json({"next_offset": 3, "files": {KEY: [DAY1, 0, 10]}}).marks == {}
    body = json.loads(state.dumps())
    body["marks"].append(["shop", "h2", "f9", 1, [], ["2023", None], None])  # damaged: dropped alone
    body["marks"].append("junk")
    loaded = PartitionState.from_json(body)
    assert loaded.marks == state.marks and loaded.files == state.files


def test_marks_are_capped_and_expire(tmp_path):
    sink = make_sink(tmp_path, max_marks=10)
    sink.write({TP: [wm(n, acked=0, file_id=f"f{n}") for n in range(25)]})
    assert len(sink.states[TP].marks) <= 10
    assert sink.metrics.counts["audit_marks_evicted"] >= 15
    m = dict(sink.states[TP].marks)
    assert marks.expire(m, min(x.heard_ms for x in m.values()) + 1) >= 1


# -- crash safety: the report is a function of the durable state ------------------------------


STEPS = [
    ("journal", "begin"),
    ("files", "sync"),
    ("report_writer", "write"),
    ("journal", "commit"),
    ("journal", "save_states"),
    ("journal", "clear"),
]
FULL = data_records(lines(3))
BATCHES = [  # Kafka offsets 0..10 in order; bytes [50, 60) never arrive
    {TP: [*FULL, wm(3, acked=30)]},
    {
        TP: [
            *data_records(lines(2, start=3), first_kafka=4, offset=30),
            *data_records(lines(3, start=6), first_kafka=6, offset=60),
            wm(9, acked=90),
        ]
    },
    {TP: [wm(10, acked=90, ts=DAY2)]},
]


def _reports(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in (root / ".keplerlog/audit").rglob("*.json")}


def _clean(root, batches=BATCHES):
    root.mkdir(exist_ok=True)
    sink = make_sink(root, "clean")
    for batch in batches:
        sink.write(batch)
    return _reports(root)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("part", "method"), STEPS)
def test_killed_at_each_step_the_replay_writes_the_same_reports(tmp_path, part, method, when):
    expected = _clean(tmp_path / "clean")
    root = tmp_path / "crash"
    root.mkdir()
    sink = make_sink(root, "victim")
    sink.write(BATCHES[0])
    obj = getattr(sink, part)
    real = getattr(obj, method)
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        calls["n"] += 1
        if when == "after":
            real(*args, **kwargs)
        raise Killed

    setattr(obj, method, killed)
    with pytest.raises(Killed):
        sink.write(BATCHES[1])
    assert calls["n"] == 1
    die(sink)
    # Reports follow the committed marks (at most every interval), so a crash may leave them
    # behind; whatever a peer's recovery makes durable, its owner's assignment writes them from it.
    peer = Journal(str(root), "peer")
    peer.recover()
    durable = peer.load(*TP)
    peer.close()
    fresh = make_sink(root, "fresh")
    start = fresh.assign([TP])[TP]
    for day in reports.days(durable.marks.values()):
        rel = report_rel(day, *TP)
        assert (root / rel).read_bytes() == reports.build(*TP, day, durable.marks.values()).encode()
    for batch in BATCHES:
        rest = [r for r in batch[TP] if r.offset >= start]
        if rest:
            fresh.write({TP: rest})
    assert _reports(root) == expected
    assert day_files(root) == day_files(tmp_path / "clean")
    d1 = json.loads(expected[report_rel("20231114", "t", 0)])["sources"][0]
    assert (d1["missing"], d1["stored"]) == ([[50, 60]], 80)


def test_reports_lost_with_the_partition_come_back_on_assignment(tmp_path):
    sink = make_sink(tmp_path, "one")
    for batch in BATCHES:
        sink.write(batch)
    expected = _reports(tmp_path)
    for path in (tmp_path / ".keplerlog/audit").rglob("*.json"):
        path.unlink()
    sink.journal.close()
    make_sink(tmp_path, "two").assign([TP])
    assert _reports(tmp_path) == expected


def test_a_full_disk_on_the_report_does_not_hold_the_logs_back_and_is_retried(tmp_path):
    sink = make_sink(tmp_path)
    real = sink.report_writer.write
    state = {"fail": 1}

    def write(reports):
        if state["fail"]:
            state["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(reports)

    sink.report_writer.write = write
    assert sink.write({TP: [*FULL, wm(3, acked=30)]}) == {TP: 4}  # committed all the same
    assert day_files(tmp_path) == {"shop/portal.20231114": b"".join(lines(3))}
    assert sink.metrics.counts["audit_report_failures"] == 1 and state["fail"] == 0
    assert not (tmp_path / report_rel("20231114", *TP)).exists()
    assert sink.reports_due()
    sink.write({})  # the next turn (an empty batch when nothing else comes) writes it
    assert report(tmp_path)["sources"][0]["stored"] == 30 and not sink.reports_due()


def test_reports_follow_the_marks_at_most_every_interval_and_on_revoke(tmp_path):
    sink = make_sink(tmp_path, report_interval_s=3600)
    sink.write({TP: [*FULL, wm(3, acked=10)]})  # the partition's first report: at once
    assert report(tmp_path)["sources"][0]["acked"] == 10
    sink.write({TP: [wm(4, acked=30)]})
    assert report(tmp_path)["sources"][0]["acked"] == 10 and not sink.reports_due()  # interval
    sink.revoke([TP])  # given up: the next owner continues from the written state
    assert report(tmp_path)["sources"][0]["acked"] == 30


def test_a_report_that_cannot_be_written_for_another_reason_does_not_stop_the_logs(tmp_path):
    (tmp_path / ".keplerlog").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".keplerlog/audit").symlink_to(tmp_path / "elsewhere")  # planted
    sink = make_sink(tmp_path)
    assert sink.write({TP: [*FULL, wm(3, acked=30)]}) == {TP: 4}
    assert sink.metrics.counts["audit_report_failures"] == 1
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing written through the link
    assert day_files(tmp_path)["shop/portal.20231114"] == b"".join(lines(3))


def test_disk_full_on_data_then_retry_gives_the_clean_report(tmp_path):
    state = {"fail": 1}

    def write(fd, data):
        if state["fail"]:
            state["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    sink = make_sink(tmp_path, ops=FileOps(write=write))
    with pytest.raises(DiskFullError):
        sink.write(BATCHES[0])
    for batch in BATCHES:
        sink.write(batch)
    assert _reports(tmp_path) == _clean(tmp_path / "clean")


# -- metrics ---------------------------------------------------------------------------------


def test_audit_gauges_are_bounded_by_the_label_cap(monkeypatch):
    from keplerlog.consumer import route as route_mod

    monkeypatch.setattr(route_mod, "LABELS_CAP", 2)
    m = Metrics()
    m.set_audit(
        [{("s", "a"): (5, 1, 0), ("s", "b"): (50, 1, 0)}, {("s", "c"): (0, 0, 7), ("s", "a"): (1, 1, 0)}]
    )
    text = m.render()
    assert 'keplerlog_consumer_audit_missing_bytes{module="b",service="s"} 50.0' in text
    assert 'keplerlog_consumer_audit_missing_bytes{module="a",service="s"} 6.0' in text
    assert 'module="c"' not in text  # the pair with the least missing bytes is left out


# -- reports and keplerlog-audit ------------------------------------------------------------------


def row(host="h1", service="shop", module="portal", file_id="f1", shipped=100, missing=(), lost=(), ts=DAY1):
    missing_bytes = sum(e - s for s, e in missing)
    return Row(
        service=service,
        module=module,
        host=host,
        path="/app/x.log",
        file_id=file_id,
        state="open",
        first=0,
        acked=shipped,
        seen=shipped + sum(e - s for s, e, _ in lost),
        window_start=0,
        shipped=shipped,
        stored=shipped - missing_bytes,
        missing=tuple(missing),
        missing_bytes=missing_bytes,
        lost=tuple(lost),
        lost_bytes=sum(e - s for s, e, _ in lost),
        watermark_ts_ms=ts,
        incomplete_since_ms=ts if missing else None,
    )


def put(root, day, rows, partition=0, topic="t"):
    rep = Report(day, topic, partition, max((r.watermark_ts_ms for r in rows), default=0), tuple(rows))
    path = root / report_rel(day, topic, partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rep.encode())
    return path


def audit(capsys, *args):
    rc = audit_main.main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_report_round_trips_through_the_parser(tmp_path):
    r = Report("20231114", "t", 3, DAY1, (row(missing=[(10, 20)], lost=[(100, 110, "deleted")]),))
    assert parse(r.encode(), "20231114") == r


def test_threshold_is_exact_and_the_default_is_a_hundredth_of_a_percent(tmp_path, capsys):
    put(tmp_path, "20231114", [row(shipped=1_000_000, missing=[(0, 100)])])  # exactly 0.01 %
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 0 and "99.9900%" in out and "0.0100%" in out and out.rstrip().endswith("OK")
    put(tmp_path, "20231114", [row(shipped=1_000_000, missing=[(0, 101)])])
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 1 and "FAIL: loss rate over 0.0100% for shop/portal, overall" in out
    assert "missing 101 bytes at [0, 101)" in out
    rc, _, _ = audit(capsys, "--root", tmp_path, "--day", "20231114", "--threshold", "0.001")
    assert rc == 0


def test_silent_agents_are_a_finding(tmp_path, capsys):
    put(tmp_path, "20231113", [row(host="h1"), row(host="h2", ts=DAY1 - 86_400_000)])
    put(tmp_path, "20231114", [row(host="h1")])
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114", "--json")
    body = json.loads(out)
    assert rc == 1 and body["silent"] == [
        {"host": "h2", "service": "shop", "last_watermark_ts_ms": DAY1 - 86_400_000}
    ]
    assert body["total"]["loss_rate"] == 0 and body["ok"] is False
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert (
        "host h2 service shop, last watermark 2023-11-13T22:13:20Z" in out and "FAIL: 1 silent agent" in out
    )


def test_sources_in_two_partitions_count_once_with_the_latest_account(tmp_path):
    put(tmp_path, "20231114", [row(shipped=50, ts=DAY1)], partition=0)
    put(tmp_path, "20231114", [row(shipped=80, ts=DAY1 + 1)], partition=1)
    today = load_day(str(tmp_path), "20231114")
    findings = summarize("20231114", "20231113", 0.0001, today, [])
    assert findings.total.shipped == 80 and findings.total.files == 1


def test_lost_at_source_counts_in_the_loss_rate(tmp_path, capsys):
    put(tmp_path, "20231114", [row(shipped=900, lost=[(900, 1000, "rotated")])])
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114", "--json")
    total = json.loads(out)["total"]
    assert rc == 1 and (total["lost_bytes"], total["loss_rate"], total["completeness"]) == (100, 0.1, 0.9)


HEAD = b'{"format": 1, "day": "20231114", "topic": "t", "partition": 0, "updated_ms": 0, "sources": '


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": 2}', "format 2 not supported"),
        (
            b'{"format": 1, "day": "20231115", "topic": "t", "partition": 0, "updated_ms": 0, "sources": []}',
            "its day 20231115",
        ),
        (HEAD.replace(b'"t"', b'"../x"') + b"[]}", "topic is not a Kafka topic name"),
        (HEAD.replace(b'"partition": 0', b'"partition": -1') + b"[]}", "partition is not a non-negative"),
        (HEAD + b"[{}]}", "source #0: first is not a non-negative integer"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_a_bad_report_is_named_and_nothing_crashes(tmp_path, capsys, content, problem):
    put(tmp_path, "20231114", [row()], partition=0)
    bad = tmp_path / report_rel("20231114", "t", 1)
    bad.write_bytes(content)
    rc, out, err = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(bad) in err and problem in err, err


def test_a_tampered_row_is_refused(tmp_path, capsys):
    path = put(tmp_path, "20231114", [row(missing=[(0, 10)])])
    path.write_bytes(path.read_bytes().replace(b'"stored":90', b'"stored":100'))
    rc, _, err = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 2 and "stored + missing_bytes is not shipped" in err


def test_symlinks_and_devices_are_not_read(tmp_path, capsys):
    put(tmp_path, "20231114", [row()])
    link = tmp_path / report_rel("20231114", "t", 1)
    link.symlink_to("/dev/zero")
    with pytest.raises(LoadError, match="symlink"):
        load_day(str(tmp_path), "20231114")
    link.unlink()
    os.mkfifo(link)
    rc, _, err = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 2 and "not a regular file" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--day", "2023-11-14"], "--day '2023-11-14' is not a date YYYYMMDD"),
        (["--day", "20231399"], "is not a date YYYYMMDD"),
        (["--day", "20231114", "--threshold", "2"], "--threshold 2.0 is not a rate"),
        (["--day", "20231114", "--threshold", "x"], "invalid float value"),
        (["--day", "20231114", "--root", "/nonexistent/root"], "is not a directory"),
        (["--day", "20231114"], "--root DIR (the consumer's data root) or --config consumer.yml is required"),
        (["--day", "20231114", "--root", "{root}"], "no reports for 20231114"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    rc, out, err = audit(capsys, *(a.format(root=tmp_path) for a in args))
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert err.startswith("keplerlog-audit: ")


def test_the_default_day_is_yesterday_and_the_root_can_come_from_the_consumer_config(tmp_path, capsys):
    from datetime import date, timedelta

    yesterday = (date.today() - timedelta(days=1)).strftime("%Y%m%d")
    put(tmp_path, yesterday, [row()])
    cfg = tmp_path / "consumer.yml"
    cfg.write_text(f"root: {tmp_path}\n")
    rc, out, _ = audit(capsys, "--config", cfg)
    assert rc == 0 and out.startswith(f"keplerlog-audit {yesterday}: 1 report file below {tmp_path}")


def test_the_audit_writes_nothing(tmp_path, capsys):
    put(tmp_path, "20231113", [row(host="h2")])
    put(tmp_path, "20231114", [row()])
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}
    os.chmod(tmp_path, 0o555)
    try:
        assert audit(capsys, "--root", tmp_path, "--day", "20231114")[0] == 1
    finally:
        os.chmod(tmp_path, 0o755)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")} == before


def test_hostile_names_are_escaped_in_the_text_output(tmp_path, capsys):
    put(tmp_path, "20231114", [row(host="h\x1b[2J1", missing=[(0, 10)])])
    rc, out, _ = audit(capsys, "--root", tmp_path, "--day", "20231114")
    assert rc == 1 and "\x1b" not in out and "h\\x1b[2J1" in out


def test_plan_never_carries_a_watermark(tmp_path):
    router, plan, files, holds, mk = make_router(tmp_path), Plan(), {}, {}, {}
    for rec in [*data_records(lines(2)), wm(2, acked=20)]:
        router.route(rec, files, plan, DAY1, holds, mk)
    assert b"".join(b"".join(c) for c in plan.chunks.values()) == b"".join(lines(2))
    assert plan.audit_days == {("t", 0, "20231114")} and list(mk) == [KEY]


def test_a_partition_read_again_from_a_pinned_offset_keeps_its_marks(tmp_path):
    """A held line pins the partition's offset: after a restart the watermarks behind it are read
    again onto marks that already hold them (day 1 and day 2). They are skipped, not re-applied
    (re-applying yesterday's first watermark would pull today's window back)."""
    held = data_records([b"x\nheld without end"], file_id="f2")  # Kafka offset 0: the pin
    f1 = [
        data_records([b"abcd\n"], first_kafka=1)[0],
        wm(2, acked=5),
        data_records([b"efgh\n"], first_kafka=3, offset=5)[0],
        wm(4, acked=10),
        data_records([b"012345678\n"], first_kafka=5, offset=10)[0],
        wm(6, acked=20, ts=DAY2),
    ]
    sink = make_sink(tmp_path, "one")
    sink.write({TP: [*held, *f1]})
    assert Journal(str(tmp_path), "r").load(*TP).next_offset == 0  # the pin really holds the offset
    before = _reports(tmp_path)
    assert json.loads(before[report_rel("20231115", *TP)])["sources"][0]["shipped"] == 10
    die(sink)
    again = make_sink(tmp_path, "two")
    assert again.assign([TP]) == {TP: 0}
    again.write({TP: [*held, *f1]})
    assert again.metrics.counts["watermarks_replayed"] == 3 and again.metrics.counts["watermarks"] == 0
    assert _reports(tmp_path) == before


# -- hostile and late watermarks (found in review) -------------------------------------------


def test_a_watermark_nested_past_the_stack_is_quarantined_not_a_crash_loop(tmp_path):
    sink = make_sink(tmp_path)
    good = wm(1, 100)
    nested = Rec("t", 0, 1, DAY1, good.headers, b"[" * 2048 + b"]" * 2048)
    sink.write({TP: [*data_records(lines(10)), nested]})
    assert sink.metrics.counts["quarantined"] == 1 and sink.metrics.counts["watermarks"] == 0
    assert day_files(tmp_path)["shop/portal.20231114"] == b"".join(lines(10))


def test_a_number_no_float_holds_is_quarantined_and_the_page_still_renders(tmp_path):
    sink = make_sink(tmp_path)
    good = wm(1, 100)
    huge = b'{"first":0,"seen":0,"acked":1' + b"0" * 4000 + b',"state":"open","lost":[]}'
    sink.write({TP: [Rec("t", 0, 1, DAY1, good.headers, huge)]})
    assert sink.metrics.counts["quarantined"] == 1
    assert "keplerlog_consumer_quarantined_total 1.0" in sink.metrics.render()


def test_a_host_of_undecodable_bytes_is_measured_as_on_the_wire(tmp_path):
    sink = make_sink(tmp_path)
    good = wm(10, 100)
    headers = [(n, b"\xff" * 200 if n == "kl.host" else v) for n, v in good.headers]
    data = [Rec(*r[:4], [(n, b"\xff" * 200 if n == "kl.host" else v) for n, v in r.headers], r.value)
            for r in data_records(lines(10))]  # fmt: skip
    sink.write({TP: [*data, Rec("t", 0, 10, DAY1, headers, good.value)]})
    assert len(sink.states[TP].marks) == 1
    (found,) = load_day(str(tmp_path), "20231114")  # the audit reads the report back
    assert [r.missing_bytes for r in found.sources] == [0]
    again = Journal(str(tmp_path), "other").load("t", 0)  # and a new owner the state
    assert len(again.marks) == 1


def test_a_long_path_is_kept_short_in_the_marks(tmp_path):
    sink = make_sink(tmp_path)
    path = "/" + "d" * 4000
    sink.write({TP: [wm(0, 0, path=path)]})
    (mark,) = sink.states[TP].marks.values()
    assert len(mark.cur.path.encode()) == marks.MAX_PATH_BYTES and path.startswith(mark.cur.path)


def test_a_watermark_from_days_ago_does_not_rebuild_an_old_report_without_its_files(tmp_path):
    sink = make_sink(tmp_path)
    sink.write({TP: [*data_records(lines(10)), wm(10, 100, ts=DAY1)]})
    sink.write({TP: [wm(11, 100, ts=DAY2)]})  # f1 goes on the next day
    before = {r["file_id"] for r in report(tmp_path)["sources"]}
    # a new source whose agent clock is three days behind the newest mark
    sink.write({TP: [wm(12, 50, ts=DAY1 - 2 * 86_400_000, file_id="other")]})
    assert sink.metrics.counts["watermarks_late"] == 1
    assert {r["file_id"] for r in report(tmp_path)["sources"]} >= before  # the day kept its file
    assert not (tmp_path / report_rel("20231112", "t", 0)).exists()

"""Byte-range dedup and record bounds: out-of-order re-sends are written, replays are not.

The fault these tests model is the one kafka-python produces when it expires batch B and
delivers the later batch C: the re-send of B arrives below what is already written.
"""

import itertools
import random
from collections import Counter, namedtuple
from zoneinfo import ZoneInfo

import pytest
from consumer_support import ANY_TIME

from keplerlog.consumer import coverage
from keplerlog.consumer.files import FileCache
from keplerlog.consumer.journal import Journal, PartitionState
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Plan, Router, TsWindow
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.record import MAX_HEADER_BYTES, Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
NOW = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
TP = ("t", 0)
KEY = "shop\x1fh1\x1ff1"


def record(kafka_offset, offset, value, ts=NOW, host="h1", file_id="f1", path="/app/x.log"):
    b = Batch("shop", "portal", host, path, file_id, offset, value.count(b"\n"), ts)
    return Rec("t", 0, kafka_offset, ts, b.headers(), value)


def router(root, window=ANY_TIME):
    return Router(Layout("{module}.{day}"), ZoneInfo("UTC"), PathGuard(str(root)), ts_window=window)


def written(plan):
    return b"".join(b"".join(chunks) for chunks in plan.chunks.values())


def test_resend_below_a_later_batch_is_written_not_dropped(tmp_path):
    """B expired, C delivered, B re-sent, then C re-sent: B is written once, C is dropped."""
    r, files, plan = router(tmp_path), {}, Plan()
    a, b, c = b"a1\na2\n", b"b1\nb2\n", b"c1\n"
    r.route(record(0, 0, a), files, plan, NOW)
    r.route(record(1, 12, c), files, plan, NOW)  # B (6..12) missing: a hole opens
    assert plan.counts["gaps"] == 1 and plan.counts["gap_bytes"] == 6
    r.route(record(2, 6, b + c), files, plan, NOW)  # the agent re-sends from B
    assert written(plan) == a + c + b
    assert plan.counts["gap_fills"] == 1 and plan.counts["gap_fill_bytes"] == 6
    assert plan.counts["partial_overlaps"] == 1 and plan.counts["duplicate_bytes"] == 3
    r.route(record(3, 0, a + b + c), files, plan, NOW)  # a full replay
    assert plan.counts["duplicate_records"] == 1 and written(plan) == a + c + b
    assert files[KEY][1:] == [0, 15]  # one range again


@pytest.mark.parametrize("seed", range(20))
def test_any_order_of_overlapping_resends_writes_every_byte_once(tmp_path, seed):
    """Random record cuts of one file, re-sent in random order with duplicates: each byte once."""
    rnd = random.Random(seed)
    lines = [f"line {i} {'x' * rnd.randrange(40)}\n".encode() for i in range(200)]
    source = b"".join(lines)
    ends = [0]
    for line in lines:
        ends.append(ends[-1] + len(line))
    records = []
    for _ in range(3):  # three independent cuttings, as three agent restarts would re-batch
        cuts = sorted({0, len(lines), *rnd.sample(range(1, len(lines)), 30)})
        records += [(ends[i], source[ends[i] : ends[j]]) for i, j in itertools.pairwise(cuts)]
    rnd.shuffle(records)
    r, files, plan = router(tmp_path), {}, Plan()
    for n, (offset, value) in enumerate(records):
        r.route(record(n, offset, value), files, plan, NOW)
    out = written(plan)
    assert len(out) == len(source)  # nothing twice, nothing missing
    assert sorted(out.splitlines(keepends=True)) == sorted(lines)  # whole lines only
    assert files[KEY][1:] == [0, len(source)]
    c = plan.counts
    assert c["bytes"] == len(source) and c["gap_bytes"] == c["gap_fill_bytes"] > 0
    assert c["gaps_given_up"] == 0


def test_holes_are_bounded_and_the_lowest_is_given_up():
    counts: Counter[str] = Counter()
    entry = None
    for i in range(70):  # 70 records with a 1-byte hole before each but the first
        entry = coverage.decide(entry, i * 10, i * 10 + 9, NOW, counts, max_ranges=64).entry
    assert (len(entry) - 1) // 2 == 64
    assert counts["gaps"] == 69 and counts["gaps_given_up"] == 6 and counts["gap_bytes_given_up"] == 6
    # a late fill of a given-up hole counts as duplicate, one of an open hole is written
    given_up = coverage.decide(entry, 9, 10, NOW, counts, max_ranges=64)
    assert given_up.write == [] and counts["duplicate_records"] == 1
    still_open = coverage.decide(entry, 69 * 10 - 1, 69 * 10, NOW, counts, max_ranges=64)
    assert still_open.write == [(689, 690)]


def test_state_entries_round_trip_and_old_form_is_read(tmp_path):
    state = PartitionState(5, {KEY: [NOW, 0, 6, 12, 15]})
    assert PartitionState.from_json(state.to_json()) == state
    old = PartitionState.from_json({"next_offset": 5, "files": {KEY: [15, NOW]}})
    assert old.files[KEY] == [NOW, 0, 15]  # the old high-water mark: everything below written
    for bad in ([NOW, 6, 0], [NOW, 0, 6, 6, 9], [NOW], [NOW, 0, 6, 9], ["x", 0, 1], [NOW, -1, 3]):
        with pytest.raises(ValueError):
            PartitionState.from_json({"next_offset": 5, "files": {KEY: bad}})


def test_out_of_order_resend_survives_a_restart(tmp_path):
    """The open hole is in the durable state: a new process still writes the late re-send."""

    def sink(cid):
        files = FileCache(str(tmp_path), 16, 60)
        return Sink(router(tmp_path), files, Journal(str(tmp_path), cid), Metrics())

    first = sink("one")
    first.write({TP: [record(0, 0, b"a\n"), record(1, 4, b"c\n")]})
    first.journal.close()
    second = sink("two")
    second.assign([TP])
    second.write({TP: [record(2, 2, b"b\nc\n"), record(3, 0, b"a\n")]})
    assert (tmp_path / "portal.20231114").read_bytes() == b"a\nc\nb\n"
    assert second.metrics.counts["gap_fills"] == 1 and second.metrics.counts["duplicate_records"] == 1


@pytest.mark.parametrize("label", ["kl.host", "kl.file", "kl.path", "kl.service", "kl.module"])
def test_oversized_labels_are_quarantined_not_kept_as_keys(tmp_path, label):
    limit = MAX_HEADER_BYTES[label]
    good = record(0, 0, b"x\n")
    r, files = router(tmp_path), {}
    at_limit = [(k, b"a" * limit if k == label else v) for k, v in good.headers]
    plan = Plan()
    r.route(good._replace(headers=at_limit), files, plan, NOW)
    assert plan.counts["quarantined"] == 0 and len(files) == 1
    over = [(k, b"a" * (limit * 10) if k == label else v) for k, v in good.headers]
    plan = Plan()
    r.route(good._replace(offset=1, headers=over), files, plan, NOW)
    assert plan.counts["quarantined"] == 1 and len(files) == 1
    assert f"header {label} longer than {limit} bytes".encode() in written(plan)


def test_sources_per_partition_are_capped(tmp_path):
    files = FileCache(str(tmp_path), 16, 60)
    s = Sink(router(tmp_path), files, Journal(str(tmp_path), "cap"), Metrics(), max_sources=100)
    batch = [record(n, 0, b"x\n", file_id=f"f{n}") for n in range(250)]
    s.write({TP: batch})
    assert len(s.states[TP].files) <= 100
    assert s.metrics.counts["sources_evicted"] == 250 - 90
    assert "f249" in {k.split("\x1f")[2] for k in s.states[TP].files}  # the newest are kept


@pytest.mark.parametrize(
    ("ts", "day", "out"),
    [
        (NOW, "20231114", 0),
        (NOW - 29 * 86_400_000, "20231016", 0),
        (NOW - 31 * 86_400_000, "20231114", 1),  # older than the window: receive day
        (NOW + 86_400_000, "20231115", 0),
        (NOW + 2 * 86_400_000, "20231114", 1),  # a clock a day ahead or more
        (4_102_444_800_000, "20231114", 1),  # year 2100
        (0, "20231114", 1),  # 1970
    ],
)
def test_far_future_or_past_is_filed_under_the_receive_day(tmp_path, ts, day, out):
    r, plan = router(tmp_path, TsWindow()), Plan()
    r.route(record(0, 0, b"x\n", ts=ts), {}, plan, NOW)
    assert list(plan.chunks) == [f"portal.{day}"]
    assert plan.counts["ts_out_of_range"] == out

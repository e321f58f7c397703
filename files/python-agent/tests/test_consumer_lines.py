"""Whole lines in a day file that merges many source files (lines.py), through the real Sink.

A long line reaches the consumer as several records (the agent cuts it), with other files'
records of the same module in between; a partial line arrives before its end. The day file
must still hold every line whole, exactly once, also across a crash between the pieces.
"""

import time
from collections import namedtuple
from zoneinfo import ZoneInfo

from consumer_support import ANY_TIME, die

from keplerlog.consumer.files import FileCache
from keplerlog.consumer.journal import Journal
from keplerlog.consumer.lines import MARKER, LinePolicy
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Router
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.record import Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
NOW = 1_700_000_000_000
TP = ("t", 0)
DAY_FILE = "shop/portal.20231114"


class Source:
    """One source file of module portal: cuts its bytes into records at given offsets."""

    def __init__(self, file_id: str) -> None:
        self.file_id = file_id
        self.offset = 0

    def record(self, kafka_offset: int, value: bytes) -> Rec:
        b = Batch("shop", "portal", "h1", f"/app/{self.file_id}.log", self.file_id, self.offset, 1, NOW)
        self.offset += len(value)
        return Rec("t", 0, kafka_offset, NOW, b.headers(), value)


def make_sink(root, cid="lines", policy=None):
    router = Router(
        Layout("{service}/{module}.{day}"),
        ZoneInfo("UTC"),
        PathGuard(str(root)),
        ts_window=ANY_TIME,
        lines=policy,
    )
    return Sink(router, FileCache(str(root), 16, 60), Journal(str(root), cid), Metrics())


def pieces(line: bytes, size: int) -> list[bytes]:
    return [line[i : i + size] for i in range(0, len(line), size)]


def interleaved(long_line: bytes, piece: int, busy_lines: int = 3):
    """Records of a long line (cut every `piece` bytes) with a busy file's records in between."""
    long_src, busy_src = Source("long"), Source("busy")
    recs, busy = [], []
    for n, part in enumerate(pieces(long_line, piece)):
        recs.append(long_src.record(len(recs), part))
        for i in range(busy_lines):
            text = f"2026-12-02 10:00:{n:02d},{i:03d} DEBUG busy line {n}.{i}\n".encode()
            busy.append(text)
            recs.append(busy_src.record(len(recs), text))
    return recs, busy


def test_a_long_line_between_other_files_records_is_written_whole(tmp_path):
    long_line = b"L" * 10_000 + b"\n"
    recs, busy = interleaved(long_line, 900)
    sink = make_sink(tmp_path)
    assert sink.write({TP: recs}) == {TP: len(recs)}
    lines = (tmp_path / DAY_FILE).read_bytes().splitlines(keepends=True)
    assert sorted(lines) == sorted([long_line, *busy])  # whole, once each
    assert sink.metrics.counts["lines_joined"] == 1 and sink.metrics.counts["lines_cut"] == 0


def test_pieces_in_separate_batches_pin_the_commit_to_the_first_piece(tmp_path):
    long_line = b"M" * 5000 + b"\n"
    recs, busy = interleaved(long_line, 1000)
    sink = make_sink(tmp_path)
    committed = [sink.write({TP: recs[i : i + 2]})[TP] for i in range(0, len(recs), 2)]
    last_piece = max(i for i, r in enumerate(recs) if r.value[:1] == b"M" or r.value == b"\n")
    # until the line's last piece is in, the partition may not commit past its first record
    assert committed[: last_piece // 2] == [0] * (last_piece // 2)
    assert committed[last_piece // 2 :] == list(range(last_piece // 2 * 2 + 2, len(recs) + 1, 2))
    lines = (tmp_path / DAY_FILE).read_bytes().splitlines(keepends=True)
    assert sorted(lines) == sorted([long_line, *busy])


def test_crash_between_pieces_loses_nothing_and_writes_nothing_twice(tmp_path):
    """kill -9 after some pieces: a new process reads from the state's offset; exact result."""
    long_line = b"N" * 7000 + b"\n"
    recs, busy = interleaved(long_line, 1000)
    first = make_sink(tmp_path, "first")
    half = len(recs) // 2
    first.write({TP: recs[:half]})
    busy_written = (tmp_path / DAY_FILE).read_bytes()
    assert b"N" not in busy_written and busy_written  # the busy file's lines are on disk already
    die(first)  # kill -9: its held pieces are gone with it
    second = make_sink(tmp_path, "second")
    resume = second.assign([TP])[TP]
    assert resume == 0  # the first piece's record
    assert second.write({TP: recs[resume:]}) == {TP: len(recs)}
    lines = (tmp_path / DAY_FILE).read_bytes().splitlines(keepends=True)
    assert sorted(lines) == sorted([long_line, *busy])
    c = second.metrics.counts
    assert c["duplicate_records"] == len([r for r in recs[:half] if b"busy" in r.value])


def test_a_line_ten_times_the_cap_is_written_in_marked_pieces(tmp_path):
    cap = 4096
    long_line = bytes(range(97, 123)) * 1600 + b"\n"  # 41,601 bytes: over 10x the cap
    recs, busy = interleaved(long_line, 1000)
    sink = make_sink(tmp_path, policy=LinePolicy(max_line_bytes=cap))
    sink.write({TP: recs})
    data = (tmp_path / DAY_FILE).read_bytes()
    lines = data.splitlines(keepends=True)
    marked = [line for line in lines if line.endswith(MARKER)]
    plain = [line for line in lines if not line.endswith(MARKER)]
    held_at_cut = -(-cap // 1000) * 1000  # the held bytes grow by one 1000-byte piece at a time
    assert len(marked) == sink.metrics.counts["lines_cut"] == len(long_line) // held_at_cut == 8
    assert all(len(line) - len(MARKER) >= cap for line in marked)  # each piece is one cap or more
    assert all(len(line) - len(MARKER) < cap + 1000 for line in marked)  # ... at most one record more
    # the pieces are in order, nothing else is glued to them, and they restore the line
    (last,) = [p for p in plain if b"busy" not in p]
    rebuilt = b"".join(line[: -len(MARKER)] for line in marked) + last
    assert rebuilt == long_line
    assert sorted(p for p in plain if b"busy" in p) == sorted(busy)


def test_a_line_end_that_does_not_come_is_written_with_a_newline_after_hold_s(tmp_path):
    src, other = Source("slow"), Source("other")
    sink = make_sink(tmp_path, policy=LinePolicy(hold_s=0.3))
    assert sink.write({TP: [src.record(0, b"first\npartial wri"), other.record(1, b"o1\n")]}) == {TP: 0}
    assert not sink.has_expired_holds()
    time.sleep(0.35)
    assert sink.has_expired_holds()
    assert sink.write({}) == {TP: 2}  # the empty batch the app submits when idle
    assert (tmp_path / DAY_FILE).read_bytes() == b"first\no1\npartial wri\n"
    assert sink.metrics.counts["newlines_added"] == 1
    # the writer finishes its line later: the rest is its own line, not glued to another
    sink.write({TP: [src.record(2, b"te done\n"), other.record(3, b"o2\n")]})
    assert (tmp_path / DAY_FILE).read_bytes() == b"first\no1\npartial wri\nte done\no2\n"


def test_a_slow_writer_within_hold_s_gets_its_line_whole(tmp_path):
    src, other = Source("slow"), Source("other")
    sink = make_sink(tmp_path, policy=LinePolicy(hold_s=30))
    sink.write({TP: [src.record(0, b"2026-12-02 slow")]})
    for n in range(5):
        sink.write({TP: [other.record(1 + 2 * n, f"o{n}\n".encode()), src.record(2 + 2 * n, b" ..")]})
    sink.write({TP: [src.record(11, b" done\n")]})
    lines = (tmp_path / DAY_FILE).read_bytes().splitlines(keepends=True)
    assert sorted(lines) == sorted(
        [b"2026-12-02 slow .. .. .. .. .. done\n", *(f"o{n}\n".encode() for n in range(5))]
    )
    assert sink.metrics.counts["lines_joined"] == 1 and sink.metrics.counts["newlines_added"] == 0


def test_a_gap_after_held_bytes_ends_the_held_line(tmp_path):
    src = Source("g")
    sink = make_sink(tmp_path)
    sink.write({TP: [src.record(0, b"head")]})
    src.offset += 100  # bytes lost upstream
    sink.write({TP: [src.record(1, b"after the gap\n")]})
    assert (tmp_path / DAY_FILE).read_bytes() == b"head\nafter the gap\n"
    assert sink.metrics.counts["newlines_added"] == 1 and sink.metrics.counts["gaps"] == 1


def test_lines_before_an_over_long_end_come_first_and_open_no_gap(tmp_path):
    """One record: a whole line, then an incomplete line already past the cap. The whole line is
    written before the marked piece (file order), and no hole is counted between them."""
    src = Source("mixed")
    sink = make_sink(tmp_path, policy=LinePolicy(max_line_bytes=1024))
    tail = b"T" * 3000
    sink.write({TP: [src.record(0, b"head line\n" + tail), src.record(1, b"end\n")]})
    assert (tmp_path / DAY_FILE).read_bytes() == b"head line\n" + tail + MARKER + b"end\n"
    c = sink.metrics.counts
    assert c["lines_cut"] == 1 and c["gaps"] == 0 and c["gap_fills"] == 0


def test_held_bytes_past_max_held_bytes_are_written_oldest_first(tmp_path):
    """Ten sources each holding 1 KiB against a 4 KiB partition budget: the oldest go first
    (with a newline added) until the rest fit; nothing past hold_s is needed for that."""
    policy = LinePolicy(hold_s=3600, max_held_bytes=4096)
    sources = [Source(f"s{i}") for i in range(10)]
    sink = make_sink(tmp_path, policy=policy)
    sink.write({TP: [src.record(i, b"x" * 1024) for i, src in enumerate(sources)]})
    # the expiry runs when the partition is written: all ten were held at once, six went out
    held = sink.holds[TP]
    assert sum(len(h.data) for h in held.values()) <= 4096 and len(held) == 4
    assert sorted(k.split("\x1f")[2] for k in held) == ["s6", "s7", "s8", "s9"]
    assert sink.metrics.counts["newlines_added"] == 6
    assert (tmp_path / DAY_FILE).read_bytes() == (b"x" * 1024 + b"\n") * 6


# -- a gap filled later: a record lost upstream (the producer gave up on it) and re-sent after
# the records that followed it (coverage.py). Found by a randomised run of re-sends, losses and
# mid-line boundaries over the Sink; before, bytes that arrived were lost, lines of two sources
# were glued, and a piece was held for hold_s with nothing left to wait for.


def _at(src: Source, offset: int, kafka_offset: int, value: bytes) -> Rec:
    src.offset = offset
    return src.record(kafka_offset, value)


def test_a_resent_record_just_before_held_bytes_is_joined_to_them_not_put_in_their_place(tmp_path):
    """[7,10) arrives first, ends mid-line and is held (the commit pinned at its offset); the
    re-send of [0,7) ends mid-line too, right where the held bytes start. Its tail replaced the
    held bytes, which were never written, and the commit moved past them."""
    x = Source("x")
    data = b"x1\nAAAABBBCC\n"
    sink = make_sink(tmp_path)
    assert sink.write({TP: [_at(x, 7, 0, data[7:10])]}) == {TP: 0}  # held: pinned
    assert sink.write({TP: [_at(x, 0, 1, data[0:7])]}) == {TP: 0}  # still pinned: nothing written
    assert sink.write({TP: [_at(x, 10, 2, data[10:])]}) == {TP: 3}
    assert (tmp_path / DAY_FILE).read_bytes() == data
    c = sink.metrics.counts
    assert (c["newlines_added"], c["lines_joined"], c["duplicate_bytes"]) == (0, 1, 0)  # one whole line


def test_a_resent_record_ending_mid_line_below_written_bytes_ends_its_line_before_another_source(tmp_path):
    """[7,12) (the end of a line) arrives first and is written; the re-send of [0,12) writes only
    [0,7), which stops mid-line. The next source's line was appended to it ("AAAAy1")."""
    x, y = Source("x"), Source("y")
    data = b"x1\nAAAABBBB\n"
    sink = make_sink(tmp_path)
    sink.write({TP: [_at(x, 7, 0, data[7:])]})
    sink.write({TP: [_at(x, 0, 1, data), y.record(2, b"y1\n")]})
    assert (tmp_path / DAY_FILE).read_bytes() == b"BBBB\nx1\nAAAA\ny1\n"  # split, never glued
    c = sink.metrics.counts
    assert (c["newlines_added"], c["duplicate_bytes"]) == (1, 5)


def test_a_piece_whose_rest_is_already_written_is_not_held(tmp_path):
    """The re-send of exactly [0,7) ends mid-line; the rest of its line, [7,12), was written
    before it. Held, it waited for a continuation that had come already: hold_s with the
    partition's commit pinned, then written with a newline anyway."""
    x = Source("x")
    data = b"x1\nAAAABBBB\n"
    sink = make_sink(tmp_path, policy=LinePolicy(hold_s=3600))
    sink.write({TP: [_at(x, 7, 0, data[7:])]})
    assert sink.write({TP: [_at(x, 0, 1, data[:7])]}) == {TP: 2}  # not pinned
    assert not sink.holds[TP]
    assert (tmp_path / DAY_FILE).read_bytes() == b"BBBB\nx1\nAAAA\n"


def test_held_bytes_apart_from_a_new_incomplete_end_are_written_not_dropped(tmp_path):
    """Two incomplete ends of one source with bytes missing between them ([3,5) re-sent while
    [7,10) is held): one source holds one end, so the held one is written (a newline added)
    rather than replaced."""
    x = Source("x")
    data = b"x1\nAAAABBBCC\n"
    sink = make_sink(tmp_path, policy=LinePolicy(hold_s=3600))
    sink.write({TP: [_at(x, 7, 0, data[7:10])]})
    sink.write({TP: [_at(x, 0, 1, data[0:5])]})
    sink.write({TP: [_at(x, 5, 2, data[5:7]), _at(x, 10, 3, data[10:])]})
    got = (tmp_path / DAY_FILE).read_bytes()
    assert b"BBB\n" in got  # the held bytes, ended
    assert sorted(got.replace(b"\n", b"")) == sorted(data.replace(b"\n", b""))  # every byte, once
    assert sink.metrics.counts["newlines_added"] >= 1 and not sink.holds[TP]

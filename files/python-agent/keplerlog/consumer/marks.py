"""Per source file, the latest watermark reconciled with what is stored: the audit's state.

A watermark (record.Watermark) says which bytes [first, acked) of a file Kafka acknowledged
before it was produced, on the same partition; so when the consumer routes it, every one of
those bytes still in the topic has been routed already. What the coverage (coverage.py) does not
hold, and is not held as an incomplete line end (lines.py: pending, not missing), is *missing*:
deleted by retention before it was read, quarantined, or lost in a given-up hole.

A `Mark` keeps what the daily report and the metrics need: the file's labels, its latest
watermark of the current day (`cur`) and the last one of the day before (`prev`, so a report of
yesterday that is rewritten after midnight keeps the file), and the holes coverage gave up. Marks
are immutable (a batch that fails is planned again from the previous ones) and live in the
partition state (journal.py), saved atomically with the coverage they were computed from.

Reconciling is deterministic: replaying the same records onto the same state gives the same
mark (no wall-clock time enters a report), so a crash anywhere replays to the same report. A
partition can also be read again from *before* records its state already holds (a held line
pins the offset, lines.py): a watermark that is not newer than the mark's, by Kafka offset and
by agent clock, was reconciled already and is skipped (`replayed`).

Size: a mark is one compact JSON list, ~250 bytes for a typical file, encoded once when it is
made (the state is rewritten every batch; unchanged marks cost a string join, not an encode).
Bounds: at most MAX_SPANS missing spans (the lower ones are counted, `dropped`), the watermark's
own bound of lost ranges, MAX_MARKS marks per partition (the least recently heard tenth goes),
and marks not heard for MARK_TTL_MS are forgotten.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from keplerlog.record import (
    LOSS_REASONS,
    MAX_HEADER_BYTES,
    MAX_LOST_RANGES,
    WATERMARK_STATES,
    Watermark,
    label_bytes,
)

from . import coverage, spans
from .lines import Held
from .spans import Span

log = logging.getLogger(__name__)

MAX_SPANS = coverage.MAX_RANGES  # missing spans kept per file (and given-up holes)
MAX_MARKS = 20_000  # per partition: ~5 MB of state at ~250 bytes a mark
# A mark keeps at most this much of its file's path (it names the file in reports; the key is
# host and file id). 4 KB paths in 20,000 forged watermarks would make ~80 MB of state a batch.
MAX_PATH_BYTES = 512
MARK_TTL_MS = 3 * 86_400_000  # today, yesterday's late rewrites, and a day of slack

Lost = tuple[tuple[int, int, str], ...]
_DAY = re.compile(r"\d{8}\Z")


@dataclass(frozen=True, slots=True)
class Snap:
    """A file as of its latest watermark of one day: what one report row is made of.

    `missing` lies within [first, acked), the highest MAX_SPANS spans; the lower ones beyond the
    cap are only counted (`dropped` bytes, all ending at or below `dropped_end`). The report's
    window for `day` is [window_start, acked): window_start is the acked value of the file's
    last watermark of an earlier day (else `first`), so each byte counts on one day only. Lost
    ranges are not tied to acked (a truncated tail lies above it), so the day's lost bytes are
    `lost` minus `lost_counted`, the lost spans already reported on earlier days.
    """

    day: str
    module: str
    path: str
    state: str
    first: int
    acked: int
    seen: int
    window_start: int
    lost: Lost
    missing: tuple[Span, ...]
    dropped: int
    dropped_end: int
    ts_ms: int  # the agent's clock when it made the watermark
    since_ms: int | None  # Kafka time of the watermark that first showed the file incomplete
    lost_counted: tuple[Span, ...] = ()

    @property
    def missing_bytes(self) -> int:
        """Missing bytes of the whole file as of this watermark (spans and dropped ones)."""
        return spans.total(self.missing) + self.dropped

    @property
    def lost_bytes(self) -> int:
        """Bytes the agent reported lost at the source, whole file."""
        return sum(e - s for s, e, _ in self.lost)


@dataclass(frozen=True, slots=True)
class Mark:
    """One source file's audit state; `enc` is its JSON, made once (marks are immutable)."""

    service: str
    host: str
    file_id: str
    heard_ms: int  # consumer clock of the latest watermark: expiry only, never reported
    offset: int  # Kafka offset of the latest watermark (in this partition)
    cur: Snap
    prev: Snap | None = None
    given_up: tuple[Span, ...] = ()  # holes coverage treats as written although never stored
    enc: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc", json.dumps(self._to_list(), separators=(",", ":")))

    @property
    def key(self) -> str:
        """The source key shared with coverage and holds."""
        return f"{self.service}\x1f{self.host}\x1f{self.file_id}"

    def _to_list(self) -> list[object]:
        cur, prev = self.cur, self.prev
        return [
            self.service,
            self.host,
            self.file_id,
            self.heard_ms,
            self.offset,
            _flat(self.given_up),
            _snap_list(cur, None),
            None if prev is None else _snap_list(prev, cur),
        ]


def _flat(items: Iterable[Span]) -> list[int]:
    return [x for span in items for x in span]


def _snap_list(snap: Snap, shared: Snap | None) -> list[object]:
    """Encode a snap; module and path are null when they equal `shared`'s (prev vs cur)."""
    return [
        snap.day,
        None if shared is not None and shared.module == snap.module else snap.module,
        None if shared is not None and shared.path == snap.path else snap.path,
        snap.state,
        snap.first,
        snap.acked,
        snap.seen,
        snap.window_start,
        [x for s, e, r in snap.lost for x in (s, e, r)],
        _flat(snap.missing),
        snap.dropped,
        snap.dropped_end,
        snap.ts_ms,
        snap.since_ms,
        _flat(snap.lost_counted),
    ]


# -- reconciliation ------------------------------------------------------------------------------


def replayed(old: Mark | None, wm: Watermark, offset: int) -> bool:
    """Tell whether watermark `wm` at Kafka `offset` is already in the mark (read again).

    Both must hold: an agent clock that went back is still a new watermark (higher offset), and
    so is one on a topic that was recreated (offsets from 0 again, a later clock).
    """
    return old is not None and offset <= old.offset and wm.ts_ms <= old.cur.ts_ms


def reconcile(
    old: Mark | None,
    wm: Watermark,
    day: str,
    entry: coverage.Entry | None,
    held: Held | None,
    offset: int,
    heard_ms: int,
    now_ms: int,
) -> Mark:
    """Return the source's mark after watermark `wm` (of `day`), given its coverage and holds.

    `offset`, `heard_ms`: the watermark record's Kafka offset and timestamp (the "incomplete
    since" time, the same on a replay). An agent clock that went back to an earlier day keeps
    the mark on its day.
    """
    lost_counted: tuple[Span, ...] = ()
    if old is not None and day <= old.cur.day:
        day, prev, window_start = old.cur.day, old.prev, old.cur.window_start
        lost_counted = old.cur.lost_counted
    elif old is not None:  # the first watermark of a new day: yesterday's last one closes its window
        prev, window_start = old.cur, old.cur.acked
        counted = spans.union([*old.cur.lost_counted, *((s, e) for s, e, _ in old.cur.lost)])
        lost_counted = tuple(counted[-MAX_LOST_RANGES:])  # dropping the lowest can only count again
    else:
        prev, window_start = None, wm.first
    window_start = min(max(window_start, wm.first), wm.acked)
    missing = spans.uncovered(wm.first, wm.acked, entry[1:] if entry else ())
    given_up = old.given_up if old is not None else ()
    if given_up:
        missing = spans.union([*missing, *spans.clip(given_up, wm.first, wm.acked)])
    if held is not None:
        missing = spans.minus(missing, held.start, held.end)
    dropped = dropped_end = 0
    if len(missing) > MAX_SPANS:
        below = missing[:-MAX_SPANS]
        dropped, dropped_end = spans.total(below), below[-1][1]
        missing = missing[-MAX_SPANS:]
    since = None
    if missing or dropped:
        since = old.cur.since_ms if old is not None and old.cur.since_ms is not None else heard_ms
    cur = Snap(
        day=day,
        module=wm.module,
        path=short_path(wm.path),
        state=wm.state,
        first=wm.first,
        acked=wm.acked,
        seen=wm.seen,
        window_start=window_start,
        lost=_disjoint(wm.lost),
        missing=tuple(missing),
        dropped=dropped,
        dropped_end=dropped_end,
        ts_ms=wm.ts_ms,
        since_ms=since,
        lost_counted=lost_counted,
    )
    return Mark(wm.service, wm.host, wm.file_id, now_ms, offset, cur, prev, given_up)


def _disjoint(lost: Lost) -> Lost:
    """Lost ranges sorted and without overlaps (an overlap keeps the earlier range's reason)."""
    out: list[tuple[int, int, str]] = []
    for start, end, reason in sorted(lost):
        start = max(start, out[-1][1]) if out else start
        if end > start:
            out.append((start, end, reason))
    return tuple(out)


def note_given_up(mark: Mark, gone: Sequence[Span]) -> Mark:
    """Remember holes coverage gave up: their bytes stay missing (bounded: lowest ones merged)."""
    merged = spans.union([*mark.given_up, *gone])
    while len(merged) > MAX_SPANS:  # merging over-reports a little, it never hides a loss
        merged[:2] = [(merged[0][0], merged[1][1])]
    return replace(mark, given_up=tuple(merged))


# -- bounds --------------------------------------------------------------------------------------


def expire(marks: dict[str, Mark], limit_ms: int) -> int:
    """Forget marks not heard since `limit_ms`; returns how many."""
    old = [key for key, mark in marks.items() if mark.heard_ms < limit_ms]
    for key in old:
        del marks[key]
    return len(old)


def evict(marks: dict[str, Mark], cap: int = MAX_MARKS) -> int:
    """Past `cap`, forget the least recently heard tenth; returns how many."""
    if len(marks) <= cap:
        return 0
    keep = cap * 9 // 10
    by_age = sorted(marks, key=lambda k: marks[k].heard_ms)
    for key in by_age[: len(marks) - keep]:
        del marks[key]
    return len(by_age) - keep


def totals(marks: Iterable[Mark]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Per (service, module): missing bytes, files with missing bytes, bytes lost at the source."""
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for mark in marks:
        cur = mark.cur
        labels = (mark.service, cur.module)
        missing, incomplete, lost = out.get(labels, (0, 0, 0))
        gap = cur.missing_bytes
        out[labels] = (missing + gap, incomplete + (gap > 0), lost + cur.lost_bytes)
    return out


# -- state file form ---------------------------------------------------------------------------


def encode_all(marks: dict[str, Mark]) -> str:
    """Return the JSON array of all marks (each encoded when it was made)."""
    return "[" + ",".join(mark.enc for mark in marks.values()) + "]"


def decode_all(value: object) -> dict[str, Mark]:
    """Parse the state file's marks; a malformed one is dropped with a log line, not the state.

    Dropping a mark loses one file's audit window, while refusing the state would lose the
    partition's dedup ranges and write duplicates.
    """
    if value is None:
        return {}
    if not isinstance(value, list):
        log.error("state: marks is not a list: ignored")
        return {}
    out: dict[str, Mark] = {}
    bad = 0
    for item in value:
        try:
            mark = _mark_from(item)
        except (ValueError, TypeError, IndexError) as exc:
            bad += 1
            if bad == 1:
                log.error("state: malformed audit mark dropped (%s)", exc)
            continue
        out[mark.key] = mark
    if bad > 1:
        log.error("state: %d malformed audit marks dropped", bad)
    return out


def short_path(path: str) -> str:
    """Return `path` cut to MAX_PATH_BYTES on the wire (undecodable bytes stay escaped)."""
    raw = path.encode("utf-8", "surrogateescape") if label_bytes(path) > MAX_PATH_BYTES else b""
    return raw[:MAX_PATH_BYTES].decode("utf-8", "surrogateescape") if raw else path


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


def _str(value: object, limit: int) -> str:
    if not isinstance(value, str) or label_bytes(value) > limit:
        raise ValueError("not a string within its bound")
    return value


def _pairs(value: object, limit: int) -> tuple[Span, ...]:
    if not isinstance(value, list) or len(value) % 2 or len(value) > 2 * limit:
        raise ValueError("not a flat list of ranges")
    out = tuple((_int(value[i]), _int(value[i + 1])) for i in range(0, len(value), 2))
    if any(s >= e for s, e in out) or any(a[1] > b[0] for a, b in itertools.pairwise(out)):
        raise ValueError("ranges not sorted and disjoint")
    return out


def _mark_from(item: object) -> Mark:
    if not isinstance(item, list) or len(item) != 8:
        raise ValueError("a mark is a list of 8")
    service = _str(item[0], MAX_HEADER_BYTES["kl.service"])
    host = _str(item[1], MAX_HEADER_BYTES["kl.host"])
    file_id = _str(item[2], MAX_HEADER_BYTES["kl.file"])
    cur = _snap_from(item[6], None)
    prev = None if item[7] is None else _snap_from(item[7], cur)
    return Mark(service, host, file_id, _int(item[3]), _int(item[4]), cur, prev, _pairs(item[5], MAX_SPANS))


def _snap_from(item: object, shared: Snap | None) -> Snap:
    if not isinstance(item, list) or len(item) != 15:
        raise ValueError("a snapshot is a list of 15")
    day = item[0]
    if not isinstance(day, str) or not _DAY.match(day):
        raise ValueError("day is not YYYYMMDD")
    module = shared.module if item[1] is None and shared else _str(item[1], MAX_HEADER_BYTES["kl.module"])
    path = shared.path if item[2] is None and shared else _str(item[2], MAX_HEADER_BYTES["kl.path"])
    if item[3] not in WATERMARK_STATES:
        raise ValueError("unknown state")
    raw_lost = item[8]
    if not isinstance(raw_lost, list) or len(raw_lost) % 3 or len(raw_lost) > 3 * MAX_LOST_RANGES:
        raise ValueError("lost is not a flat list of (start, end, reason)")
    lost = tuple(
        (_int(raw_lost[i]), _int(raw_lost[i + 1]), raw_lost[i + 2]) for i in range(0, len(raw_lost), 3)
    )
    if any(r not in LOSS_REASONS or e < s for s, e, r in lost):
        raise ValueError("lost range malformed")
    first, acked, seen, window_start = (_int(x) for x in item[4:8])
    if not first <= window_start <= acked <= seen:
        raise ValueError("first <= window_start <= acked <= seen does not hold")
    since = item[13]
    return Snap(
        day=day,
        module=module,
        path=path,
        state=str(item[3]),
        first=first,
        acked=acked,
        seen=seen,
        window_start=window_start,
        lost=lost,
        missing=_pairs(item[9], MAX_SPANS),
        dropped=_int(item[10]),
        dropped_end=_int(item[11]),
        ts_ms=_int(item[12]),
        since_ms=None if since is None else _int(since),
        lost_counted=_pairs(item[14], MAX_LOST_RANGES),
    )

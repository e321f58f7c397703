"""Which byte ranges of one source file are already in the central files: replay dedup.

A record carries the bytes [offset, offset + len(value)) of one source file. A single high-water
mark per file is not enough: kafka-python may expire batch B and deliver the later batch C, so
the agent's re-send of B arrives *below* what is already written and must still be written.
So each source keeps the set of written ranges, and a record writes exactly the parts of its
range that are not in the set.

Representation (also the state-file form): a flat list `[seen_ms, s0, e0, s1, e1, ...]` of
sorted, disjoint, non-touching half-open ranges. In the normal case (records arrive in order)
it is one range that grows at its end, so the fast path is a comparison and a short copy.
Lists are never changed in place: the caller keeps the previous state until a batch is durable.

Bound: at most `max_ranges` ranges per source. Past it, the lowest hole is given up (treated as
written, its bytes counted as `gap_bytes_given_up`): a record filling it later is dropped as a
duplicate. Holes only stay open when data was lost upstream, so this bounds memory and state
size without touching the normal case.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .spans import uncovered

MAX_RANGES = 64
Entry = list[int]  # [seen_ms, s0, e0, s1, e1, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one record: the new entry, and the parts of its range to write."""

    entry: Entry
    write: list[tuple[int, int]]


def decide(
    entry: Entry | None, start: int, end: int, now_ms: int, counts: Counter[str], max_ranges: int = MAX_RANGES
) -> Decision:
    """Compare a record's range with what is written; count duplicates, holes and fills."""
    length = end - start
    if entry is None:
        return Decision([now_ms, start, end], [(start, end)])
    last_end = entry[-1]
    if start == last_end:  # the common case: the next record of the file
        return Decision([now_ms, *entry[1:-1], end], [(start, end)])
    if start > last_end:  # a hole opens: bytes before this record have not arrived (yet)
        counts["gaps"] += 1
        counts["gap_bytes"] += start - last_end
        return Decision(_bound([now_ms, *entry[1:], start, end], counts, max_ranges), [(start, end)])
    ranges = entry[1:]
    parts = uncovered(start, end, ranges)
    written = sum(e - s for s, e in parts)
    if written == 0:
        counts["duplicate_records"] += 1
        counts["duplicate_bytes"] += length
        return Decision(entry if entry[0] == now_ms else [now_ms, *ranges], [])
    if written < length:
        counts["partial_overlaps"] += 1
        counts["duplicate_bytes"] += length - written
    # Invariant: gap_bytes - gap_fill_bytes - gap_bytes_given_up = bytes in open holes.
    first = ranges[0]
    if end < first:  # a record before everything written, not touching it: a hole below
        counts["gaps"] += 1
        counts["gap_bytes"] += first - end
    filled = sum(max(0, min(e, last_end) - max(s, first)) for s, e in parts)
    if filled:
        counts["gap_fills"] += 1
        counts["gap_fill_bytes"] += filled
    merged = _union(ranges, start, end)
    return Decision(_bound([now_ms, *merged], counts, max_ranges), parts)


def covered(entry: Entry | None, start: int, end: int) -> bool:
    """Tell whether every byte of [start, end) is already written."""
    return entry is not None and not uncovered(start, end, entry[1:])


def _union(ranges: list[int], start: int, end: int) -> list[int]:
    """Ranges plus [start, end), merging overlapping and touching ranges."""
    out: list[int] = []
    placed = False
    for i in range(0, len(ranges), 2):
        r_start, r_end = ranges[i], ranges[i + 1]
        if r_end < start:
            out += (r_start, r_end)
        elif r_start > end:
            if not placed:
                out += (start, end)
                placed = True
            out += (r_start, r_end)
        else:
            start, end = min(start, r_start), max(end, r_end)
    if not placed:
        out += (start, end)
    return out


def _bound(entry: Entry, counts: Counter[str], max_ranges: int) -> Entry:
    """Give up the lowest holes while there are more than `max_ranges` ranges."""
    while (len(entry) - 1) // 2 > max_ranges:
        counts["gaps_given_up"] += 1
        counts["gap_bytes_given_up"] += entry[3] - entry[2]
        entry = [entry[0], entry[1], *entry[4:]]
    return entry


def from_state(value: object) -> Entry:
    """Parse a state-file entry; accepts the older `[end, seen_ms]` high-water-mark form."""
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError("a source entry must be a list of non-negative integers")
    if len(value) == 2:  # before byte ranges: everything below `end` counted as written
        return [value[1], 0, value[0]]
    if len(value) < 3 or len(value) % 2 == 0:
        raise ValueError("a source entry must be [seen_ms, start, end, ...]")
    ranges = value[1:]
    if any(ranges[i] >= ranges[i + 1] for i in range(0, len(ranges) - 1)):
        raise ValueError("source ranges must be sorted and disjoint")
    return list(value)


def seen_ms(entry: Entry) -> int:
    """When this source last had a record (for the state TTL)."""
    return entry[0]

"""Half-open byte ranges [start, end) as sorted, disjoint lists of pairs: the audit's arithmetic.

The completeness audit compares what the agent acknowledged with what the consumer stored; both
are sets of byte ranges of one source file. These helpers are small and allocation-light because
they run once per watermark (a few per file and minute), never per data record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Span = tuple[int, int]


def uncovered(start: int, end: int, flat: Sequence[int]) -> list[Span]:
    """Parts of [start, end) outside `flat` (coverage.py's `[s0, e0, s1, e1, ...]`, sorted)."""
    out: list[Span] = []
    pos = start
    for i in range(0, len(flat) - 1, 2):
        r_start, r_end = flat[i], flat[i + 1]
        if r_end <= pos:
            continue
        if r_start >= end:
            break
        if r_start > pos:
            out.append((pos, r_start))
        pos = max(pos, r_end)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out


def union(spans: Iterable[Span]) -> list[Span]:
    """Sort and merge overlapping or touching spans; empty spans are dropped."""
    out: list[Span] = []
    for s, e in sorted(span for span in spans if span[1] > span[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def minus(spans: Sequence[Span], cut_start: int, cut_end: int) -> list[Span]:
    """Spans without the bytes of [cut_start, cut_end)."""
    if cut_end <= cut_start:
        return list(spans)
    out: list[Span] = []
    for s, e in spans:
        if e <= cut_start or s >= cut_end:
            out.append((s, e))
            continue
        if s < cut_start:
            out.append((s, cut_start))
        if e > cut_end:
            out.append((cut_end, e))
    return out


def clip(spans: Iterable[Span], lo: int, hi: int) -> list[Span]:
    """Return the parts of spans inside [lo, hi)."""
    return [(max(s, lo), min(e, hi)) for s, e in spans if min(e, hi) > max(s, lo)]


def total(spans: Iterable[Span]) -> int:
    """Bytes in the spans (assumed disjoint)."""
    return sum(e - s for s, e in spans)


def holes(flat: Sequence[int]) -> list[Span]:
    """Return the gaps between consecutive ranges of a flat `[s0, e0, s1, e1, ...]` list."""
    return [(flat[i], flat[i + 1]) for i in range(1, len(flat) - 2, 2) if flat[i + 1] > flat[i]]


def subtract(spans: Sequence[Span], cuts: Iterable[Span]) -> list[Span]:
    """Spans without the bytes of every cut."""
    out = list(spans)
    for cut_start, cut_end in cuts:
        out = minus(out, cut_start, cut_end)
    return out


def given_up(old: Sequence[int], new: Sequence[int], start: int, end: int) -> list[Span]:
    """Holes of `old` that `new` claims written although the record [start, end) did not fill them.

    coverage.decide() gives up the lowest hole of a source past MAX_RANGES by treating it as
    written; for the audit those bytes are still missing (a later re-send of them is dropped).
    """
    out: list[Span] = []
    for s, e in holes(old):
        for a, b in minus([(s, e)], start, end):
            out += subtract([(a, b)], uncovered(a, b, new))
    return union(out)

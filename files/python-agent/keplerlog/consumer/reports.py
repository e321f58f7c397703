"""Write the daily completeness reports (format: keplerlog/audit/report.py) from the marks.

A report is a pure function of one partition's marks and a day, and is rewritten whole: the
sink writes the reports of the days a batch's watermarks touched after the batch's data is
fsynced and before its state is committed, so a crash at any point replays the same records
onto the same state and writes the same bytes again. On assignment the reports of the loaded
state are written too, which repairs a report an earlier owner left behind a state it never
saved (a batch dropped on revocation).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from keplerlog.audit.report import Report, Row, report_rel
from keplerlog.paths import PathGuard, UnsafePathError, make_dirs

from . import spans
from .files import replace_all
from .marks import Mark, Snap


def row(mark: Mark, snap: Snap) -> Row:
    """Return the report row of one snapshot: its day's window [window_start, acked)."""
    start, acked = snap.window_start, snap.acked
    shipped = acked - start
    missing = tuple(spans.clip(snap.missing, start, acked))
    missing_bytes = spans.total(missing)
    if snap.dropped and snap.dropped_end > start:  # spans beyond the cap: counted, not listed
        missing_bytes += snap.dropped
    missing_bytes = min(missing_bytes, shipped)
    counted = snap.lost_counted
    lost = tuple(
        (s, e, reason) for ls, le, reason in snap.lost for s, e in spans.subtract([(ls, le)], counted)
    )
    return Row(
        service=mark.service,
        module=snap.module,
        host=mark.host,
        path=snap.path,
        file_id=mark.file_id,
        state=snap.state,
        first=snap.first,
        acked=acked,
        seen=snap.seen,
        window_start=start,
        shipped=shipped,
        stored=shipped - missing_bytes,
        missing=missing,
        missing_bytes=missing_bytes,
        lost=lost,
        lost_bytes=sum(e - s for s, e, _ in lost),
        watermark_ts_ms=snap.ts_ms,
        incomplete_since_ms=snap.since_ms if missing_bytes else None,
    )


def days(marks: Iterable[Mark]) -> set[str]:
    """Every day some mark has a row for (its current and its previous day)."""
    out: set[str] = set()
    for mark in marks:
        out.add(mark.cur.day)
        if mark.prev is not None:
            out.add(mark.prev.day)
    return out


def build(topic: str, partition: int, day: str, marks: Iterable[Mark]) -> Report:
    """One partition's report of one day; rows sorted, so the same marks give the same bytes."""
    rows = []
    for mark in marks:
        snap = mark.cur if mark.cur.day == day else mark.prev
        if snap is not None and snap.day == day:
            rows.append(row(mark, snap))
    rows.sort(key=lambda r: (r.service, r.module, r.host, r.path, r.file_id))
    updated = max((r.watermark_ts_ms for r in rows), default=0)
    return Report(day, topic, partition, updated, tuple(rows))


class ReportWriter:
    """Replaces report files atomically below `{root}/.keplerlog/audit/`, fsyncing in parallel."""

    def __init__(self, root: str, guard: PathGuard) -> None:
        self.root = root
        self.guard = guard

    def write(self, reports: Iterable[Report]) -> None:
        """Write each report (temp file, fsync, rename, fsync its directory); raises OSError."""
        replace_all(self._files(reports))

    def _files(self, reports: Iterable[Report]) -> Iterator[tuple[Path, bytes]]:
        """(path, content) of each report, its directory made, its path checked first."""
        for report in reports:
            rel = report_rel(report.day, report.topic, report.partition)
            try:
                self.guard.check(rel)
            except UnsafePathError as exc:  # a symlink planted in .keplerlog: an OSError like EACCES
                raise OSError(errno.ELOOP, f"audit report {rel}: {exc}") from exc
            make_dirs(self.root, os.path.dirname(rel))
            yield Path(self.root, rel), report.encode()

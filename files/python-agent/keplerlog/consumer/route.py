"""Decide, per record, which bytes go to which file: format check, names, day, replay dedup.

Pure in-memory work (no I/O) so that a batch can be planned completely before anything is
written, and thrown away as a whole if the write fails. The record value is never parsed on the
hot path: it is appended as is (or its not-yet-seen tail on a partial replay).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from keplerlog import newlines
from keplerlog.layout import Layout, quarantine_path
from keplerlog.names import name_problem
from keplerlog.paths import PathGuard, UnsafePathError
from keplerlog.record import RecordFormatError, decode_headers, decode_watermark, is_watermark, split_legacy

from . import coverage, spans
from .lines import MARKER, Held, Holds, LinePolicy
from .marks import Mark, note_given_up, reconcile, replayed

log = logging.getLogger(__name__)


_BUCKET_MS = 15 * 60 * 1000  # every time zone offset is a multiple of 15 minutes
LABELS_CAP = 65_536  # day files whose (service, module) the router remembers for the written counters
LEGACY_DEFAULT_MODULE = "default"
_FULL_ENTRY = 2 * coverage.MAX_RANGES + 1  # a coverage entry this long gives up a hole on its next gap


class RecordLike(Protocol):
    """The parts of a kafka-python ConsumerRecord we use."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    headers: list[tuple[str, bytes]] | None
    value: bytes | None


@dataclass
class Plan:
    """The outcome of routing a batch: bytes per file, counters, read timestamps for latency."""

    chunks: dict[str, list[bytes]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    read_ts_ms: list[int] = field(default_factory=list)
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)  # day file -> (service, module)
    lines: Counter[str] = field(default_factory=Counter)  # day file -> lines known from kl.lines
    uncounted: dict[str, list[bytes]] = field(default_factory=dict)  # chunks whose lines are to count
    audit_days: set[tuple[str, int, str]] = field(default_factory=set)  # watermarks' (topic, partition, day)
    newest_day: dict[tuple[str, int], str] = field(default_factory=dict)  # of a partition's marks

    def add(self, rel: str, data: bytes, lines: int = -1) -> None:
        """Queue bytes for a file (in record order); `lines` is their newline count if known."""
        chunks = self.chunks.get(rel)
        if chunks is None:
            self.chunks[rel] = [data]
        else:
            chunks.append(data)
        if lines >= 0:
            self.lines[rel] += lines
        else:
            self.uncounted.setdefault(rel, []).append(data)


@dataclass(frozen=True, slots=True)
class _Source:
    """One source file as the router files it: dedup key, target day file, labels for logs."""

    key: str
    rel: str
    path: str
    host: str
    file_id: str

    def moved(self, rel: str) -> _Source:
        """Return this source filed into another day file (a joined line keeps its first day)."""
        return _Source(self.key, rel, self.path, self.host, self.file_id)


class RateLimitedLog:
    """At most one log line per `interval` seconds per kind; counts what it suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        """Log unless this kind was logged less than `interval` ago."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] += 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        log.warning(msg + (f" (+{suppressed} similar suppressed)" if suppressed else ""), *args)


def day_before(day: str) -> str:
    """Return the YYYYMMDD before a YYYYMMDD."""
    return (datetime.strptime(day, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")


@dataclass(frozen=True)
class TsWindow:
    """How far a record's time may be from the consumer's clock to pick its day file.

    Outside the window (a wrong clock, a forged `kl.ts`, year 2100) the record is filed under
    the day it was received and counted as `ts_out_of_range`, so every day file has a date that
    retention will reach. Ahead: 1 day (time zones are already in the timestamp); behind: 30 days
    (an agent replaying a longer backlog files it under the receive day).
    """

    max_age_ms: int = 30 * 86_400_000
    max_ahead_ms: int = 86_400_000

    def pick(self, ts_ms: int, now_ms: int, counts: Counter[str]) -> int:
        """Return the timestamp that picks the day: the record's own, or now if out of range."""
        if now_ms - self.max_age_ms <= ts_ms <= now_ms + self.max_ahead_ms:
            return ts_ms
        counts["ts_out_of_range"] += 1
        return now_ms


class Router:
    """Maps records to (file, bytes), updating a partition's dedup map in place."""

    def __init__(
        self,
        layout: Layout,
        tz: ZoneInfo,
        guard: PathGuard,
        legacy_service: str = "legacy",
        ts_window: TsWindow | None = None,
        lines: LinePolicy | None = None,
    ) -> None:
        self.layout = layout
        self.tz = tz
        self.guard = guard
        self.legacy_service = legacy_service
        self.ts_window = ts_window or TsWindow()
        self.lines = lines or LinePolicy()
        self.limited = RateLimitedLog()
        self._days: dict[int, str] = {}
        # Day file -> (service, module), for the per-module written counters. Kept across batches
        # because a held line end is flushed in a later batch than the one that named its file.
        self.labels: dict[str, tuple[str, str]] = {}
        # The value and kl.lines of the record being routed: `_known_lines`.
        self._record: tuple[bytes, int] | None = None

    def _label(self, rel: str, service: str, module: str, plan: Plan) -> None:
        plan.labels[rel] = (service, module)  # this batch's own: never lost to the cache's clear
        if rel not in self.labels:
            if len(self.labels) >= LABELS_CAP:  # days x services x modules: a clear costs a miss or two
                self.labels.clear()
            self.labels[rel] = (service, module)

    def written(self, plan: Plan) -> dict[tuple[str, str], tuple[int, int]]:
        """Bytes and lines a plan appends, per (service, module); quarantine is counted apart.

        A record written whole brings its line count in `kl.lines` (`_known_lines`); only the
        other chunks are counted here. Counting every byte was the busiest single function of
        the librdkafka consumer's interpreter (9.6 % of its CPU samples, bench/results).
        """
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for rel, chunks in plan.chunks.items():
            labels = plan.labels.get(rel) or self.labels.get(rel)
            if labels is None:
                continue
            nbytes, nlines = out.get(labels, (0, 0))
            nbytes += sum(map(len, chunks))
            nlines += plan.lines.get(rel, 0) + sum(map(newlines.count, plan.uncounted.get(rel, ())))
            out[labels] = (nbytes, nlines)
        return out

    def day(self, ts_ms: int) -> str:
        """YYYYMMDD of a millisecond timestamp in the configured zone (cached per 15 min)."""
        bucket = ts_ms // _BUCKET_MS
        day = self._days.get(bucket)
        if day is None:
            day = datetime.fromtimestamp(bucket * _BUCKET_MS / 1000, self.tz).strftime("%Y%m%d")
            if len(day) != 8:
                raise ValueError("year out of range")
            if len(self._days) > 50_000:
                self._days.clear()
            self._days[bucket] = day
        return day

    def route(
        self,
        rec: RecordLike,
        files: dict[str, coverage.Entry],
        plan: Plan,
        now_ms: int,
        holds: Holds | None = None,
        marks: dict[str, Mark] | None = None,
    ) -> None:
        """Route one record; never raises for bad input (it goes to quarantine instead).

        `files` (written ranges), `holds` (incomplete line ends) and `marks` (reconciled
        watermarks) are the partition's, changed in place; the caller passes copies and keeps
        them only once the batch is durable. Without `holds`, an incomplete end is held only
        until the end of this call's record; without `marks`, watermarks are checked, counted
        and dropped.
        """
        if holds is None:
            holds = {}
        value = rec.value or b""
        if not value:
            if is_watermark(rec.headers):  # a watermark is never empty: a malformed one
                self.quarantine(rec, value, "watermark value empty", plan, now_ms)
                return
            plan.counts["empty_records"] += 1
            return
        headers = rec.headers
        if not headers or not any(name == "kl.v" for name, _ in headers):
            self._legacy(rec, value, plan, now_ms)
            return
        try:
            batch = decode_headers(headers)
        except RecordFormatError as exc:
            if is_watermark(headers):  # off the data records' path: they decode
                self._watermark(rec, value, files, holds, marks, plan, now_ms)
            else:
                self.quarantine(rec, value, str(exc), plan, now_ms)
            return
        placed = self._place(batch.service, batch.module, batch.ts_ms, rec, value, plan, now_ms)
        if placed is None:
            return
        rel = placed[1]
        self._label(rel, batch.service, batch.module, plan)

        key = f"{batch.service}\x1f{batch.host}\x1f{batch.file_id}"
        source = _Source(key, rel, batch.path, batch.host, batch.file_id)
        self._record = (value, batch.lines)
        try:
            self._accept(
                source, batch.offset, value, batch.ts_ms, rec.offset, files, holds, plan, now_ms, marks
            )
        finally:
            self._record = None

    def _known_lines(self, value: bytes) -> int:
        """Return the record's kl.lines if `value` is that record's whole value, else -1.

        The agent counts a record's newlines as it packs it. A value that ends with a newline
        and is the very object decoded (not joined with held bytes, not cut, not trimmed) is
        what it counted: its pieces of over-long lines and timed-out partial lines, counted as
        one line each, end without one, and are held and counted here. A count that cannot be
        true (more lines than bytes, none in a value that ends a line) is not used. A wrong
        count from elsewhere moves the written_lines metric only: the bytes are the value's.
        """
        record = self._record
        if record is None or value is not record[0] or value[-1:] != b"\n":
            return -1
        lines = record[1]
        return lines if 0 < lines <= len(value) else -1

    def _place(
        self, service: str, module: str, ts_ms: int, rec: RecordLike, value: bytes, plan: Plan, now_ms: int
    ) -> tuple[str, str] | None:
        """Return the (day, day file) of a record's labels; None once it is quarantined.

        Unsafe names, or a clock or path that gives no day file below the root: data records
        and watermarks are checked alike.
        """
        problem = name_problem(service) or name_problem(module)
        if problem:
            plan.counts["unsafe_names"] += 1
            self.quarantine(rec, value, f"unsafe service/module: {problem}", plan, now_ms)
            return None
        try:
            day = self.day(self.ts_window.pick(ts_ms, now_ms, plan.counts))
            rel = self.layout.render(service, module, day)
            self.guard.check(rel)
        except (ValueError, OverflowError, OSError) as exc:
            self.quarantine(rec, value, f"bad kl.ts or path: {exc}", plan, now_ms)
            return None
        return day, rel

    def _watermark(
        self,
        rec: RecordLike,
        value: bytes,
        files: dict[str, coverage.Entry],
        holds: Holds,
        marks: dict[str, Mark] | None,
        plan: Plan,
        now_ms: int,
    ) -> None:
        """Reconcile a watermark with its source's stored ranges; it is never written to a day file.

        Checked as a data record is (format, names, day, path), and quarantined alike. Its day
        (of the agent's clock, in the day files' zone) picks the report it goes into.
        """
        try:
            wm = decode_watermark(rec.headers, value)
        except RecordFormatError as exc:
            self.quarantine(rec, value, str(exc), plan, now_ms)
            return
        placed = self._place(wm.service, wm.module, wm.ts_ms, rec, value, plan, now_ms)
        if placed is None:
            return
        day = placed[0]
        key = f"{wm.service}\x1f{wm.host}\x1f{wm.file_id}"
        entry = files.get(key)
        if entry is not None and entry[0] < now_ms:  # still followed: its ranges must not expire
            files[key] = [now_ms, *entry[1:]]
        if marks is None:
            plan.counts["watermarks"] += 1
            return
        old = marks.get(key)
        if replayed(old, wm, rec.offset):  # read again from before the state's end (a pin)
            plan.counts["watermarks_replayed"] += 1
            return
        plan.counts["watermarks"] += 1
        # Marks hold a source's current and previous day only, and a day's report is rebuilt
        # from them: a watermark dated before the day before the partition's newest (an agent
        # clock behind, a long-buffered one) counts for that day, or it would rebuild an old
        # day's report without the files it held.
        tp = (rec.topic, rec.partition)
        newest = plan.newest_day.get(tp)
        if newest is None:
            newest = plan.newest_day[tp] = max((m.cur.day for m in marks.values()), default=day)
        earliest = day_before(newest)
        if day < earliest:
            day = earliest
            plan.counts["watermarks_late"] += 1
        heard_ms = rec.timestamp if rec.timestamp is not None and rec.timestamp > 0 else now_ms
        mark = reconcile(old, wm, day, entry, holds.get(key), rec.offset, heard_ms, now_ms)
        marks[key] = mark
        plan.audit_days.add((rec.topic, rec.partition, mark.cur.day))
        if mark.cur.day > newest:
            plan.newest_day[tp] = mark.cur.day

    def _accept(
        self,
        src: _Source,
        start: int,
        value: bytes,
        ts_ms: int,
        kafka_offset: int,
        files: dict[str, coverage.Entry],
        holds: Holds,
        plan: Plan,
        now_ms: int,
        marks: dict[str, Mark] | None = None,
    ) -> None:
        """Join a record with its source's held bytes, hold its incomplete end, write the rest."""
        held = holds.get(src.key)
        end = start + len(value)
        if held is not None and end > held.start:
            if held.start <= start <= held.end < end:  # the continuation (or a re-send of it)
                del holds[src.key]
                if b"\n" in value:  # this record ends the held line
                    plan.counts["lines_joined"] += 1
                value = held.data[: start - held.start] + value
                start, ts_ms, kafka_offset = held.start, held.ts_ms, held.kafka_offset
                src = src.moved(held.rel)
            elif start < held.start and end >= held.end:  # a re-send that carries all of it
                del holds[src.key]
            elif held.start <= start and end <= held.end:  # a replay of bytes already held
                plan.counts["duplicate_records"] += 1
                plan.counts["duplicate_bytes"] += len(value)
                return
            elif start < held.start:  # a re-send ending inside the held bytes: keep its head
                value, end = value[: held.start - start], held.start
            else:  # the source went on elsewhere (a gap): the held line will not be completed
                self.flush(src.key, holds, files, plan, now_ms, cut=False, marks=marks)
        since = time.monotonic()
        held = holds.get(src.key)
        if held is not None and end == held.start:
            # The bytes just before the held ones (a re-send of a record lost upstream, which the
            # agent had sent before them): the held bytes continue this record.
            del holds[src.key]
            value += held.data
            end = held.end
            kafka_offset, since = min(kafka_offset, held.kafka_offset), held.since
        cut = value.rfind(b"\n") + 1
        entry = files.get(src.key)
        if (
            cut < len(value)
            and not coverage.covered(entry, start + cut, end)
            and not coverage.covered(entry, end, end + 1)  # its continuation is not written yet
        ):
            if cut:  # the whole lines first, then the incomplete end (file order kept)
                self._write(src, start, value[:cut], ts_ms, files, plan, now_ms, marks)
            if src.key in holds:  # bytes held apart from these (a gap between): never dropped
                self.flush(src.key, holds, files, plan, now_ms, cut=False, marks=marks)
            tail = value[cut:]
            holds[src.key] = Held(src.rel, start + cut, tail, ts_ms, kafka_offset, since, src.path)
            if len(tail) >= self.lines.max_line_bytes:
                self.flush(src.key, holds, files, plan, now_ms, cut=True, marks=marks)
            return
        self._write(src, start, value, ts_ms, files, plan, now_ms, marks)

    def flush(
        self,
        key: str,
        holds: Holds,
        files: dict[str, coverage.Entry],
        plan: Plan,
        now_ms: int,
        cut: bool,
        marks: dict[str, Mark] | None = None,
    ) -> None:
        """Write a source's held bytes now, marked as a piece (`cut`) or with a newline added.

        A piece: the line reached max_line_bytes. A newline: its end did not come in time.
        """
        held = holds.pop(key)
        src = _Source(key, held.rel, held.path, "", "")
        if self._write(src, held.start, held.data, held.ts_ms, files, plan, now_ms, marks, end_lines=False):
            plan.add(held.rel, MARKER if cut else b"\n")
            plan.counts["lines_cut" if cut else "newlines_added"] += 1
            plan.counts["bytes"] += len(MARKER) if cut else 1

    def _write(
        self,
        src: _Source,
        start: int,
        value: bytes,
        ts_ms: int,
        files: dict[str, coverage.Entry],
        plan: Plan,
        now_ms: int,
        marks: dict[str, Mark] | None = None,
        *,
        end_lines: bool = True,
    ) -> int:
        """Append the parts of [start, start + len(value)) not written yet; returns their size.

        A part that stops mid-line where the bytes after it are already written (a gap filled
        by a re-send, below a record that came first) ends with a newline added: its line's
        rest was written before it, and the next line appended to the day file, maybe another
        source's, would otherwise be glued to it (`end_lines`; flush adds its own).
        """
        gaps_before = plan.counts["gaps"]
        old = files.get(src.key)
        decision = coverage.decide(old, start, start + len(value), now_ms, plan.counts)
        files[src.key] = decision.entry
        if old is not None and len(old) == _FULL_ENTRY and marks:  # a hole may have been given up
            self._given_up(src.key, old, decision.entry, start, start + len(value), marks)
        if plan.counts["gaps"] != gaps_before:
            self.limited.warning(
                "gap",
                "gap in %s (file %s of %s) before offset %d: bytes not (yet) received",
                src.path,
                src.file_id,
                src.host,
                start,
            )
        if not decision.write:
            return 0
        end = start + len(value)
        if len(decision.write) == 1 and decision.write[0] == (start, end) and (old is None or end > old[-1]):
            plan.add(src.rel, value, self._known_lines(value))  # the common case: nothing written after it
            written = len(value)
        else:
            written = 0
            for part_start, part_end in decision.write:
                part = value[part_start - start : part_end - start]
                plan.add(src.rel, part)
                written += part_end - part_start
                if end_lines and part[-1:] != b"\n" and coverage.covered(old, part_end, part_end + 1):
                    plan.add(src.rel, b"\n")
                    plan.counts["newlines_added"] += 1
                    plan.counts["bytes"] += 1
        plan.counts["records"] += 1
        plan.counts["bytes"] += written
        plan.read_ts_ms.append(ts_ms)
        return written

    @staticmethod
    def _given_up(
        key: str, old: coverage.Entry, new: coverage.Entry, start: int, end: int, marks: dict[str, Mark]
    ) -> None:
        """Keep holes coverage gave up (treated as written) as missing in the source's mark."""
        mark = marks.get(key)
        if mark is None:  # no watermark yet: nothing to reconcile the hole with
            return
        gone = spans.given_up(old[1:], new[1:], start, end)
        if gone:
            marks[key] = note_given_up(mark, gone)

    def _legacy(self, rec: RecordLike, value: bytes, plan: Plan, now_ms: int) -> None:
        """Original Flume records: `module##$$##text` lines, filed under the legacy service.

        As the Flume file sink did, a line without the prefix goes to the `default` module.
        """
        ts = rec.timestamp if rec.timestamp is not None and rec.timestamp > 0 else now_ms
        day = self.day(self.ts_window.pick(ts, now_ms, plan.counts))
        lines = value.split(b"\n")
        if not lines[-1]:
            lines.pop()
        out: dict[str, list[bytes]] = {}
        for line in lines:
            parts = split_legacy(line)
            if parts is None:
                module, text = LEGACY_DEFAULT_MODULE, line
            else:
                try:
                    module = parts[0].decode("utf-8")
                except UnicodeDecodeError:
                    module = "\udcff"  # forces the unsafe-name path below
                text = parts[1]
            out.setdefault(module, []).append(text)
        for module in out:
            problem = name_problem(module)
            if problem is None:
                try:
                    self.guard.check(self.layout.render(self.legacy_service, module, day))
                except UnsafePathError as exc:
                    problem = str(exc)
            if problem:
                plan.counts["unsafe_names"] += 1
                self.quarantine(rec, value, f"unsafe legacy module: {problem}", plan, now_ms)
                return
        for module, texts in out.items():
            data = b"\n".join(texts) + b"\n"
            rel = self.layout.render(self.legacy_service, module, day)
            self._label(rel, self.legacy_service, module, plan)
            plan.add(rel, data)
            plan.counts["bytes"] += len(data)
        plan.counts["legacy_records"] += 1
        plan.counts["records"] += 1

    def quarantine(self, rec: RecordLike, value: bytes, reason: str, plan: Plan, now_ms: int) -> None:
        r"""Keep a bad record verbatim, preceded by one header line saying why and where from.

        Format: `#kl-quarantine reason="..." topic=T partition=P offset=O bytes=N\\n` + the N raw
        value bytes + `\\n`. The reason has no newline or quote; `bytes` lets a reader cut the
        value out exactly even if it contains newlines.
        """
        safe_reason = reason.replace("\n", " ").replace('"', "'")
        header = (
            f'#kl-quarantine reason="{safe_reason}" topic={rec.topic} partition={rec.partition} '
            f"offset={rec.offset} bytes={len(value)}\n"
        ).encode("utf-8", "backslashreplace")
        plan.add(quarantine_path(self.day(now_ms)), header + value + b"\n")
        plan.counts["quarantined"] += 1
        plan.quarantine_reasons[reason.split(":")[0]] += 1
        self.limited.warning(
            "quarantine", "quarantined record %s/%d@%d: %s", rec.topic, rec.partition, rec.offset, reason
        )

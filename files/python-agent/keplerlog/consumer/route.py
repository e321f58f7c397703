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
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from keplerlog.record import LEGACY_SEPARATOR, RecordFormatError, decode_headers, split_legacy

from .files import PathGuard, UnsafePathError
from .layout import Layout, quarantine_path
from .names import name_problem

log = logging.getLogger(__name__)

_BUCKET_MS = 15 * 60 * 1000  # every time zone offset is a multiple of 15 minutes
LEGACY_DEFAULT_MODULE = "default"


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

    def add(self, rel: str, data: bytes) -> None:
        """Queue bytes for a file (in record order)."""
        chunks = self.chunks.get(rel)
        if chunks is None:
            self.chunks[rel] = [data]
        else:
            chunks.append(data)


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


class Router:
    """Maps records to (file, bytes), updating a partition's dedup map in place."""

    def __init__(
        self, layout: Layout, tz: ZoneInfo, guard: PathGuard, legacy_service: str = "legacy"
    ) -> None:
        self.layout = layout
        self.tz = tz
        self.guard = guard
        self.legacy_service = legacy_service
        self.limited = RateLimitedLog()
        self._days: dict[int, str] = {}

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

    def route(self, rec: RecordLike, files: dict[str, list[int]], plan: Plan, now_ms: int) -> None:
        """Route one record; never raises for bad input (it goes to quarantine instead)."""
        value = rec.value or b""
        if not value:
            plan.counts["empty_records"] += 1
            return
        headers = rec.headers
        if not headers or not any(name == "kl.v" for name, _ in headers):
            self._legacy(rec, value, plan, now_ms)
            return
        try:
            batch = decode_headers(headers)
        except RecordFormatError as exc:
            self.quarantine(rec, value, str(exc), plan, now_ms)
            return
        problem = name_problem(batch.service) or name_problem(batch.module)
        if problem:
            plan.counts["unsafe_names"] += 1
            self.quarantine(rec, value, f"unsafe service/module: {problem}", plan, now_ms)
            return
        try:
            day = self.day(batch.ts_ms)
            rel = self.layout.render(batch.service, batch.module, day)
            self.guard.check(rel)
        except (ValueError, OverflowError, OSError) as exc:
            self.quarantine(rec, value, f"bad kl.ts or path: {exc}", plan, now_ms)
            return

        key = f"{batch.service}\x1f{batch.host}\x1f{batch.file_id}"
        start = batch.offset
        end = start + len(value)
        known = files.get(key)
        if known is not None:
            known_end = known[0]
            if end <= known_end:
                plan.counts["duplicate_records"] += 1
                plan.counts["duplicate_bytes"] += len(value)
                return
            if start < known_end:
                plan.counts["partial_overlaps"] += 1
                plan.counts["duplicate_bytes"] += known_end - start
                value = value[known_end - start :]
            elif start > known_end:
                plan.counts["gaps"] += 1
                plan.counts["gap_bytes"] += start - known_end
                self.limited.warning(
                    "gap",
                    "gap of %d bytes in %s (file %s of %s) before offset %d",
                    start - known_end,
                    batch.path,
                    batch.file_id,
                    batch.host,
                    start,
                )
        files[key] = [end, now_ms]
        plan.add(rel, value)
        plan.counts["records"] += 1
        plan.counts["bytes"] += len(value)
        plan.read_ts_ms.append(batch.ts_ms)

    def _legacy(self, rec: RecordLike, value: bytes, plan: Plan, now_ms: int) -> None:
        """Original Flume records: `module##$$##text` lines, filed under the legacy service."""
        if LEGACY_SEPARATOR not in value:
            self.quarantine(rec, value, "no kl.v header and no legacy module prefix", plan, now_ms)
            return
        ts = rec.timestamp if rec.timestamp is not None and rec.timestamp > 0 else now_ms
        try:
            day = self.day(ts)
        except (ValueError, OverflowError, OSError):
            day = self.day(now_ms)
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
            plan.add(self.layout.render(self.legacy_service, module, day), data)
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

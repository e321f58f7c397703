"""The daily completeness report: one JSON file per day and partition, written by the consumer.

`{root}/.keplerlog/audit/{YYYYMMDD}/{topic}-{partition}.json`. One file per partition, so two
consumer hosts never write the same file and a partition that moves continues its own file.
This module is the single definition of the format (documented in consumer/README.md,
"Completeness audit"): the consumer builds `Report`s and writes `encode()`; keplerlog-audit reads
them back with `parse()`, which checks every field, because a report is a file anybody with
access to the root may have edited.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from keplerlog.layout import STATE_DIR
from keplerlog.record import LOSS_REASONS, MAX_HEADER_BYTES, WATERMARK_STATES, label_bytes

FORMAT = 1
AUDIT_DIR = f"{STATE_DIR}/audit"
MAX_REPORT_BYTES = 256 * 1024 * 1024  # 20,000 sources a partition are ~10 MB
_DAY = re.compile(r"\d{8}\Z")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")  # Kafka's own rule for topic names

Span = tuple[int, int]
LostSpan = tuple[int, int, str]


_NUMBERS = (
    "first",
    "acked",
    "seen",
    "window_start",
    "shipped",
    "stored",
    "missing_bytes",
    "lost_bytes",
    "watermark_ts_ms",
)


class ReportError(ValueError):
    """A report file is unreadable or not in the format; the message names the problem."""


def is_day(day: str) -> bool:
    """Tell whether `day` is a YYYYMMDD string (the only form that becomes a directory name)."""
    return bool(_DAY.match(day))


def report_rel(day: str, topic: str, partition: int) -> str:
    """Return the report's path below the data root; ValueError for an unsafe day or topic."""
    if not is_day(day):
        raise ValueError(f"day {day!r} is not YYYYMMDD")
    if not _TOPIC.match(topic) or topic in (".", ".."):
        raise ValueError(f"topic {topic!r} is not a Kafka topic name")
    return f"{AUDIT_DIR}/{day}/{topic}-{int(partition)}.json"


@dataclass(frozen=True, slots=True)
class Row:
    """One source file's account for one day, window [window_start, acked).

    shipped = acked - window_start (acknowledged by Kafka in the window); stored = shipped -
    missing_bytes (bytes held as an incomplete line end count as stored: they are in the
    consumer's hands); missing: spans of the window not in any day file; lost: spans of
    [window_start, seen) the agent reported lost at the source, with the reason.
    """

    service: str
    module: str
    host: str
    path: str
    file_id: str
    state: str
    first: int
    acked: int
    seen: int
    window_start: int
    shipped: int
    stored: int
    missing: tuple[Span, ...]
    missing_bytes: int
    lost: tuple[LostSpan, ...]
    lost_bytes: int
    watermark_ts_ms: int
    incomplete_since_ms: int | None

    def to_json(self) -> dict[str, Any]:
        """Return the row's JSON object (field order as documented)."""
        return {
            "service": self.service,
            "module": self.module,
            "host": self.host,
            "path": self.path,
            "file_id": self.file_id,
            "state": self.state,
            "first": self.first,
            "acked": self.acked,
            "seen": self.seen,
            "window_start": self.window_start,
            "shipped": self.shipped,
            "stored": self.stored,
            "missing": [list(s) for s in self.missing],
            "missing_bytes": self.missing_bytes,
            "lost": [list(s) for s in self.lost],
            "lost_bytes": self.lost_bytes,
            "watermark_ts_ms": self.watermark_ts_ms,
            "incomplete_since_ms": self.incomplete_since_ms,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """All rows of one partition for one day."""

    day: str
    topic: str
    partition: int
    updated_ms: int  # the latest watermark_ts_ms of the rows: the same bytes on every replay
    sources: tuple[Row, ...]

    def encode(self) -> bytes:
        """Return the file content: deterministic (rows as given, fixed key order), one row a line."""
        head = {
            "format": FORMAT,
            "day": self.day,
            "topic": self.topic,
            "partition": self.partition,
            "updated_ms": self.updated_ms,
        }
        rows = ",\n".join(json.dumps(r.to_json(), separators=(",", ":")) for r in self.sources)
        return (json.dumps(head)[:-1] + ', "sources": [\n' + rows + "\n]}\n").encode()


# -- reading (keplerlog-audit) -------------------------------------------------------------------


def parse(data: bytes, day: str | None = None) -> Report:
    """Parse and check a report file's content; raise ReportError saying what is wrong.

    `day`: the directory the file was found in; a report claiming another day is refused.
    """
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"larger than {MAX_REPORT_BYTES} bytes")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise ReportError("not a JSON object")
    if body.get("format") != FORMAT:
        raise ReportError(f"format {json.dumps(body.get('format'))[:20]} not supported (expected {FORMAT})")
    found_day = body.get("day")
    if not isinstance(found_day, str) or not is_day(found_day):
        raise ReportError("day is not YYYYMMDD")
    if day is not None and found_day != day:
        raise ReportError(f"its day {found_day} is not its directory's {day}")
    topic = body.get("topic")
    if not isinstance(topic, str) or not _TOPIC.match(topic):
        raise ReportError("topic is not a Kafka topic name")
    sources = body.get("sources")
    if not isinstance(sources, list):
        raise ReportError("sources is not a list")
    rows = []
    for n, item in enumerate(sources):
        try:
            rows.append(_row(item))
        except ReportError as exc:
            raise ReportError(f"source #{n}: {exc}") from None
    return Report(
        found_day,
        topic,
        _count(body.get("partition"), "partition"),
        _count(body.get("updated_ms"), "updated_ms"),
        tuple(rows),
    )


def _count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ReportError(f"{name} is not a non-negative integer")
    return value


def _text(item: dict[str, Any], name: str, limit: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or label_bytes(value) > limit:
        raise ReportError(f"{name} is not a string of at most {limit} bytes")
    return value


def _ranges(value: object, name: str, size: int) -> list[list[Any]]:
    """Check a list of [start, end] (size 2) or [start, end, reason] (size 3) ranges."""
    if not isinstance(value, list) or len(value) > 10_000:
        raise ReportError(f"{name} is not a list of ranges")
    for span in value:
        if not isinstance(span, list) or len(span) != size:
            raise ReportError(f"{name}: a range is not a list of {size}")
        if _count(span[1], f"{name} end") < _count(span[0], f"{name} start"):
            raise ReportError(f"{name}: a range ends before it starts")
        if size == 3 and span[2] not in LOSS_REASONS:
            raise ReportError(f"{name}: unknown reason {str(span[2])[:20]!r}")
    return value


def _row(item: object) -> Row:
    if not isinstance(item, dict):
        raise ReportError("not a JSON object")
    numbers = {name: _count(item.get(name), name) for name in _NUMBERS}
    since = item.get("incomplete_since_ms")
    state = item.get("state")
    if state not in WATERMARK_STATES:
        raise ReportError(f"state {str(state)[:20]!r} unknown")
    if not numbers["window_start"] <= numbers["acked"]:
        raise ReportError("window_start is past acked")
    if numbers["shipped"] != numbers["acked"] - numbers["window_start"]:
        raise ReportError("shipped is not acked - window_start")
    if numbers["stored"] + numbers["missing_bytes"] != numbers["shipped"]:
        raise ReportError("stored + missing_bytes is not shipped")
    missing = tuple((s, e) for s, e in _ranges(item.get("missing"), "missing", 2))
    lost = tuple((s, e, str(r)) for s, e, r in _ranges(item.get("lost"), "lost", 3))
    if sum(e - s for s, e, _ in lost) != numbers["lost_bytes"]:
        raise ReportError("lost_bytes is not the sum of the lost ranges")
    return Row(
        service=_text(item, "service", MAX_HEADER_BYTES["kl.service"]),
        module=_text(item, "module", MAX_HEADER_BYTES["kl.module"]),
        host=_text(item, "host", MAX_HEADER_BYTES["kl.host"]),
        path=_text(item, "path", MAX_HEADER_BYTES["kl.path"]),
        file_id=_text(item, "file_id", MAX_HEADER_BYTES["kl.file"]),
        state=str(state),
        missing=missing,
        lost=lost,
        incomplete_since_ms=None if since is None else _count(since, "incomplete_since_ms"),
        **numbers,
    )

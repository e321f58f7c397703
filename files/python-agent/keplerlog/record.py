"""The wire format shared by the agent (producer) and the consumer.

One Kafka record carries one or more complete lines of one source file, in file order, as the
raw bytes of the file (newlines included). Labels travel as record headers so that a line is
never altered. Both sides import this module; it is the only place the format is defined.

A second kind of record, the watermark (`kl.v: wm1`, see `Watermark`), carries no lines: it is
the agent's account of one file's bytes, which the consumer reconciles with what it stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FORMAT_VERSION = 1

# Header names. Short to keep per-record overhead low; prefixed to avoid clashes with others'.
H_VERSION = "kl.v"
H_SERVICE = "kl.service"
H_MODULE = "kl.module"
H_HOST = "kl.host"
H_PATH = "kl.path"
H_FILE = "kl.file"
H_OFFSET = "kl.offset"
H_LINES = "kl.lines"
H_TS = "kl.ts"

# The original Flume agents glued `module##$$##` in front of every line.
LEGACY_SEPARATOR = b"##$$##"

# Upper bounds of label headers. Host, file id and path become replay-dedup keys kept for days,
# so a record over a bound is rejected (the consumer quarantines it) instead of bloating state.
# Hostnames are at most 253 bytes (DNS), paths at most PATH_MAX; agent file ids are ~30 bytes.
MAX_NAME_BYTES = 100  # service and module names (they become path components)
# A watermark's offsets and sizes fit a signed 64-bit integer, as Kafka's own do: larger ones are
# forged, and would break float conversions downstream (the audit's gauges).
MAX_NUMBER = 2**63 - 1
MAX_HEADER_BYTES = {
    "kl.service": MAX_NAME_BYTES,
    "kl.module": MAX_NAME_BYTES,
    "kl.host": 253,
    "kl.file": 64,
    "kl.path": 4096,
}


def label_bytes(text: str) -> int:
    """Return a decoded label's size as it was on the wire (what MAX_HEADER_BYTES bounds).

    Labels are decoded with surrogateescape (undecodable bytes kept), so that is how they are
    measured: `surrogatepass` would count an escaped byte as 3 and refuse what the header check
    let through. A lone surrogate that escape cannot encode (not from a record) counts as 3.
    """
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


class RecordFormatError(ValueError):
    """A record does not follow the kepler-log format (missing or malformed header)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Labels of one record; the payload (the lines) travels separately as the record value.

    `offset` is the byte offset of the first line in the source file identified by `file_id`,
    so `offset + len(value)` is where the next record of that file starts. The consumer uses
    this pair to drop replays and to count gaps.
    """

    service: str
    module: str
    host: str
    path: str
    file_id: str
    offset: int
    lines: int
    ts_ms: int
    version: int = FORMAT_VERSION

    def key(self) -> bytes:
        """Record key: keeps one module's records on one partition (ordering per file)."""
        return f"{self.service}/{self.module}".encode()

    def headers(self) -> list[tuple[str, bytes]]:
        """Encode the labels as Kafka record headers."""
        return [
            (H_VERSION, str(self.version).encode()),
            (H_SERVICE, self.service.encode("utf-8", "surrogateescape")),
            (H_MODULE, self.module.encode("utf-8", "surrogateescape")),
            (H_HOST, self.host.encode("utf-8", "surrogateescape")),
            (H_PATH, self.path.encode("utf-8", "surrogateescape")),
            (H_FILE, self.file_id.encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_LINES, str(self.lines).encode()),
            (H_TS, str(self.ts_ms).encode()),
        ]


def has_format_headers(headers: Iterable[tuple[str, bytes]] | None) -> bool:
    """Tell whether a record claims to be a kepler-log record (has a version header)."""
    return any(name == H_VERSION for name, _ in headers or ())


def _int(value: bytes, name: str) -> int:
    try:
        number = int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordFormatError(f"header {name} is not an integer") from exc
    if number < 0:
        raise RecordFormatError(f"header {name} is negative")
    return number


def decode_headers(headers: Sequence[tuple[str, bytes]] | None) -> Batch:
    """Decode record headers into a Batch, or raise RecordFormatError saying what is wrong.

    Unknown headers are ignored so that a newer agent can add labels without breaking an older
    consumer; an unknown *version* is rejected because the payload rules may differ.
    """
    found: dict[str, bytes] = {}
    for name, value in headers or ():
        if isinstance(name, str) and isinstance(value, bytes | bytearray):
            found.setdefault(name, bytes(value))
    if H_VERSION not in found:
        raise RecordFormatError("no kl.v header")
    version = _int(found[H_VERSION], H_VERSION)
    if version != FORMAT_VERSION:
        raise RecordFormatError(f"unknown format version {version}")

    for name, limit in MAX_HEADER_BYTES.items():
        if len(found.get(name, b"")) > limit:
            raise RecordFormatError(f"header {name} longer than {limit} bytes")

    def text(name: str) -> str:
        if name not in found:
            raise RecordFormatError(f"no {name} header")
        return found[name].decode("utf-8", "surrogateescape")

    return Batch(
        service=text(H_SERVICE),
        module=text(H_MODULE),
        host=text(H_HOST) if H_HOST in found else "",
        path=text(H_PATH) if H_PATH in found else "",
        file_id=text(H_FILE),
        offset=_int(found.get(H_OFFSET, b"x"), H_OFFSET),
        lines=_int(found.get(H_LINES, b"x"), H_LINES),
        ts_ms=_int(found.get(H_TS, b"x"), H_TS),
        version=version,
    )


def split_legacy(line: bytes) -> tuple[bytes, bytes] | None:
    """Split an original Flume agent line `module##$$##text` into (module, text), else None."""
    module, sep, rest = line.partition(LEGACY_SEPARATOR)
    if not sep or not module:
        return None
    return module, rest


# -- watermarks: what the agent knows of one source file, for the completeness audit -----------

# `kl.v` of a watermark. Not an integer on purpose: a consumer that predates watermarks fails to
# decode it and quarantines it, so a watermark is never appended to a day file during an upgrade.
WATERMARK_VERSION = "wm1"
MAX_WATERMARK_BYTES = 4096  # the JSON value; bounds what a hostile record can make us parse
MAX_LOST_RANGES = 16  # per watermark; past it the lowest ranges are merged into one

# Why bytes of a source file were lost before they were shipped (the agent knows these).
LOSS_REASONS = ("truncated", "rotated", "deleted")

# The states a watermark reports a file in.
WATERMARK_STATES = ("open", "closed", "finished", "gone")


@dataclass(frozen=True, slots=True)
class Watermark:
    """The agent's account of one source file (identity `file_id`) at its clock `ts_ms`.

    Bytes [first, acked) are acknowledged by Kafka: each was produced before this watermark, on
    the same partition (same key), so a consumer reading the watermark has read them all.
    `seen` is the file's size as last seen; `lost` lists ranges [start, end) the agent knows it
    can never ship, each with a reason from LOSS_REASONS. `state`: open (followed), closed
    (idle, resumed when it grows), finished (rotated away and shipped to its end) or gone
    (deleted, rotated or truncated with bytes unread: its `lost` ranges say which).
    """

    service: str
    module: str
    host: str
    path: str
    file_id: str
    ts_ms: int
    first: int
    seen: int
    acked: int
    state: str = "open"
    lost: tuple[tuple[int, int, str], ...] = ()

    def key(self) -> bytes:
        """Return the file's data records' key: same partition, so it is ordered after them."""
        return f"{self.service}/{self.module}".encode()

    def headers(self) -> list[tuple[str, bytes]]:
        """Labels as for data records, with `kl.v: wm1`."""
        return [
            (H_VERSION, WATERMARK_VERSION.encode()),
            (H_SERVICE, self.service.encode("utf-8", "surrogateescape")),
            (H_MODULE, self.module.encode("utf-8", "surrogateescape")),
            (H_HOST, self.host.encode("utf-8", "surrogateescape")),
            (H_PATH, self.path.encode("utf-8", "surrogateescape")),
            (H_FILE, self.file_id.encode()),
            (H_TS, str(self.ts_ms).encode()),
        ]

    def value(self) -> bytes:
        """Return the record value: compact JSON of the byte accounting."""
        body = {
            "first": self.first,
            "seen": self.seen,
            "acked": self.acked,
            "state": self.state,
            "lost": [list(r) for r in self.lost],
        }
        return json.dumps(body, separators=(",", ":")).encode()


def is_watermark(headers: Iterable[tuple[str, bytes]] | None) -> bool:
    """Tell whether a record is a watermark (`kl.v: wm1`), without decoding it."""
    return any(name == H_VERSION and value == WATERMARK_VERSION.encode() for name, value in headers or ())


def merge_lost(ranges: Iterable[tuple[int, int, str]]) -> tuple[tuple[int, int, str], ...]:
    """Sort lost ranges and keep at most MAX_LOST_RANGES (the lowest ones merged into one)."""
    out = sorted((s, e, r) for s, e, r in ranges if e > s)
    while len(out) > MAX_LOST_RANGES:
        (s0, _, r0), (_, e1, _) = out[0], out[1]
        out[:2] = [(s0, e1, r0)]
    return tuple(out)


def _number(value: object) -> bool:
    """Tell whether a JSON value is an offset: an integer in [0, MAX_NUMBER], not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMBER


def decode_watermark(headers: Sequence[tuple[str, bytes]] | None, value: bytes | None) -> Watermark:
    """Decode a watermark record, or raise RecordFormatError saying what is wrong."""
    found: dict[str, bytes] = {}
    for name, raw in headers or ():
        if isinstance(name, str) and isinstance(raw, bytes | bytearray):
            found.setdefault(name, bytes(raw))
    if found.get(H_VERSION) != WATERMARK_VERSION.encode():
        raise RecordFormatError("not a watermark")
    for name, limit in MAX_HEADER_BYTES.items():
        if len(found.get(name, b"")) > limit:
            raise RecordFormatError(f"header {name} longer than {limit} bytes")
    for name in (H_SERVICE, H_MODULE, H_FILE):
        if name not in found:
            raise RecordFormatError(f"no {name} header")
    if not value or len(value) > MAX_WATERMARK_BYTES:
        raise RecordFormatError(f"watermark value empty or over {MAX_WATERMARK_BYTES} bytes")
    try:
        body = json.loads(value)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]] nested past the stack
        raise RecordFormatError("watermark value is not JSON") from exc
    if not isinstance(body, dict):
        raise RecordFormatError("watermark value is not an object")

    def number(name: str) -> int:
        v = body.get(name)
        if not _number(v):
            raise RecordFormatError(f"watermark {name} is not a non-negative integer")
        return v

    first, seen, acked = number("first"), number("seen"), number("acked")
    if not first <= acked:
        raise RecordFormatError("watermark acked is below first")
    state = body.get("state", "open")
    if state not in WATERMARK_STATES:
        raise RecordFormatError(f"watermark state {str(state)[:20]!r} unknown")
    raw_lost = body.get("lost", [])
    if not isinstance(raw_lost, list) or len(raw_lost) > MAX_LOST_RANGES:
        raise RecordFormatError("watermark lost is not a short list")
    lost = []
    for item in raw_lost:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(_number(x) for x in item[:2])
            or item[2] not in LOSS_REASONS
            or item[1] < item[0]
        ):
            raise RecordFormatError("watermark lost range malformed")
        lost.append((item[0], item[1], item[2]))

    def text(name: str) -> str:
        return found[name].decode("utf-8", "surrogateescape") if name in found else ""

    return Watermark(
        service=text(H_SERVICE),
        module=text(H_MODULE),
        host=text(H_HOST),
        path=text(H_PATH),
        file_id=text(H_FILE),
        ts_ms=_int(found.get(H_TS, b"x"), H_TS),
        first=first,
        seen=max(seen, acked),
        acked=acked,
        state=state,
        lost=tuple(lost),
    )

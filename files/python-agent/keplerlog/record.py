"""The wire format shared by the agent (producer) and the consumer.

One Kafka record carries one or more complete lines of one source file, in file order, as the
raw bytes of the file (newlines included). Labels travel as record headers so that a line is
never altered. Both sides import this module; it is the only place the format is defined.
"""

from __future__ import annotations

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
MAX_HEADER_BYTES = {
    "kl.service": MAX_NAME_BYTES,
    "kl.module": MAX_NAME_BYTES,
    "kl.host": 253,
    "kl.file": 64,
    "kl.path": 4096,
}


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

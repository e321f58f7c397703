r"""Read records whose header keys are not UTF-8 instead of failing the whole partition.

Kafka's protocol says header keys are UTF-8, but brokers do not check it: any producer can write
`b"\xff\xfe"` as a key. kafka-python 3.0 decodes keys strictly; the UnicodeDecodeError
becomes a CorruptRecordError out of `poll()`, the fetcher is left wedged (every later `poll()`
blocks), and a restarted consumer reads the same record again: a poison pill that stops a
partition for good. The Java client decodes with replacement characters, and so do we.

How, without copying kafka-python's parser: `_read_msg()` only moves the batch position after a
record parsed completely, so on a UnicodeDecodeError we parse that one record again through a
view of the buffer whose slices decode with `errors="replace"`. The normal path is untouched
(one extra Python call per record); only a bad record takes the slow view. The consumer then
sees keys with U+FFFD, which match none of ours: such a record goes to quarantine if it lacks
a label, and is counted here either way.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_keplerlog_tolerant_keys"
_lock = threading.Lock()
_replaced = 0


class _Text(bytes):
    """A slice that decodes with replacement characters whatever errors= it is given."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes.decode(self, encoding, "replace")


class _TolerantView:
    """The record batch buffer as `_read_msg()` uses it (ints by index, bytes by slice)."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def __getitem__(self, index: int | slice) -> Any:
        item = self._buffer[index]
        return _Text(item) if isinstance(index, slice) else item

    def __len__(self) -> int:
        return len(self._buffer)


def replaced_records() -> int:
    """How many records were read with replaced header keys since the process started."""
    return _replaced


def apply() -> bool:
    """Install the tolerant re-parse on kafka-python's v2 record batches (idempotent)."""
    try:
        from kafka.record.default_records import DefaultRecordBatch
    except ImportError:
        log.warning("kafka.record.default_records not found: header keys decoded strictly")
        return False
    strict = getattr(DefaultRecordBatch, "_read_msg", None)
    if strict is None:
        log.warning("DefaultRecordBatch._read_msg not found: header keys decoded strictly")
        return False
    if getattr(strict, _MARK, False):
        return True

    def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return strict(self, *args, **kwargs)
        except UnicodeDecodeError:
            global _replaced
            buffer = self._buffer
            self._buffer = _TolerantView(buffer)
            try:
                record = strict(self, *args, **kwargs)
            finally:
                self._buffer = buffer
            with _lock:
                _replaced += 1
            return record

    setattr(_read_msg, _MARK, True)
    DefaultRecordBatch._read_msg = _read_msg
    return True


def applied() -> bool:
    """Tell whether the tolerant decoding is installed (tests, metrics)."""
    try:
        from kafka.record.default_records import DefaultRecordBatch
    except ImportError:
        return False
    return bool(getattr(getattr(DefaultRecordBatch, "_read_msg", None), _MARK, False))

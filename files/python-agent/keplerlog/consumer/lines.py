"""Whole lines in the central files: the incomplete end of a record waits for its continuation.

A day file merges many source files, so the pieces of one long line (the agent cuts lines over
its `max_line_bytes` into records) or a partial line (shipped by the agent's partial-line
timeout) cannot simply be appended as they come: another file's record in between would glue
its lines onto the piece. So the bytes after the last newline of a record are *held* per source
file until the record that continues them arrives; the joined line is then written in one
append, to the day file of its first byte.

Crash safety without a second journal: held bytes are not in the written ranges (coverage.py),
and the partition's state and Kafka commit never pass the record holding the first held byte
(`Held.kafka_offset`). After a crash or a rebalance the partition is read again from there; what
was written meanwhile is dropped by the range dedup, the held bytes are held again.

Bounds: a held line that reaches `max_line_bytes` is written as a piece ending with `MARKER`
(counted `lines_cut`), and the rest of the line goes on the same way, so memory per source is
bounded and a 100 MiB line becomes a few marked pieces plus a plain last one. Bytes held longer
than `hold_s` (a writer that stopped mid-line, or another producer's value without a newline)
are written with a newline added (`newlines_added`): the partition's commit is never pinned
for longer than that. `max_held_bytes` bounds one partition's held bytes (oldest first out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MARKER = b" [kl-cut: line continues on the next line]\n"


@dataclass(frozen=True)
class LinePolicy:
    """Limits of line assembly (consumer configuration `lines:`)."""

    max_line_bytes: int = 16 * 1024 * 1024
    hold_s: float = 60.0
    max_held_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Held:
    """The incomplete end of a source file's last record, waiting for its continuation.

    Immutable: a batch that fails (disk full) is planned again from the previous holds.
    """

    rel: str  # day file of the line's first byte
    start: int  # source offset of the first held byte
    data: bytes
    ts_ms: int  # kl.ts of the record that held the first byte (latency, day)
    kafka_offset: int  # that record: the partition must not commit past it
    since: float  # monotonic time the first byte was held
    path: str  # for log messages

    @property
    def end(self) -> int:
        """Source offset just after the held bytes: where the continuation starts."""
        return self.start + len(self.data)


Holds = dict[str, Held]  # per partition: source key -> held bytes


def pin(holds: Holds) -> int | None:
    """Return the Kafka offset a partition must be read again from (None: nothing held)."""
    return min((h.kafka_offset for h in holds.values()), default=None)


def expired(holds: Holds, policy: LinePolicy, now: float | None = None) -> list[str]:
    """Keys to flush: held longer than `hold_s`, then the oldest while over `max_held_bytes`."""
    now = time.monotonic() if now is None else now
    out = [key for key, h in holds.items() if now - h.since >= policy.hold_s]
    total = sum(len(h.data) for key, h in holds.items() if key not in out)
    if total > policy.max_held_bytes:
        for key in sorted((k for k in holds if k not in out), key=lambda k: holds[k].since):
            out.append(key)
            total -= len(holds[key].data)
            if total <= policy.max_held_bytes:
                break
    return out

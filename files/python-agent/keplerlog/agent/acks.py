"""Contiguous acknowledged offsets per file.

Kafka acknowledges records in order per partition, but a retried batch, a rewind after a
failed send and the re-send of the same bytes can all deliver acks out of order or twice.
The checkpoint may only move to the end of a *contiguous* acked prefix, otherwise a crash
could skip bytes that were never acknowledged. Acked ranges that start beyond the prefix wait
in a heap; overlapping ranges (re-sent bytes) are harmless.
"""

from __future__ import annotations

import heapq


class AckTracker:
    """Highest offset up to which every byte of one file has been acknowledged."""

    __slots__ = ("_waiting", "acked")

    def __init__(self, acked: int = 0) -> None:
        self.acked = acked
        self._waiting: list[tuple[int, int]] = []

    def ack(self, start: int, end: int) -> bool:
        """Record that bytes [start, end) were acknowledged; return True if `acked` moved."""
        if end <= self.acked:
            return False
        if start > self.acked:
            heapq.heappush(self._waiting, (start, end))
            return False
        self.acked = end
        while self._waiting and self._waiting[0][0] <= self.acked:
            _, later_end = heapq.heappop(self._waiting)
            self.acked = max(self.acked, later_end)
        return True

    @property
    def waiting(self) -> int:
        """Number of acked ranges still waiting for a gap before them to be acknowledged."""
        return len(self._waiting)

    def reset(self, acked: int) -> None:
        """Forget everything (the file restarted at `acked`, e.g. after truncation)."""
        self.acked = acked
        self._waiting.clear()

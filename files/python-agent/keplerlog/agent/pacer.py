"""How long a write waits before the agent reads it: the read coalescing window.

Every read costs the same fixed work (a loop step, a record, a produce request, an ack to
apply) whatever it brings, so a trickle of one-line writes read one by one would cost a read
per line. Waiting a fixed `read_coalesce_ms` (100 ms) after the previous read bounds that cost,
but adds 50 ms on average to every line, also at rates where each read would bring plenty.

With `read_coalesce_lines` set, the window follows the rate: a read should bring about that
many lines. At the last read's rate (its lines over the time since the read before it) that
takes `lines / rate`; the window is that, kept between MIN_WINDOW_S and `read_coalesce_ms`.
With 20, a file written at 200 lines/s is still read every 100 ms (the CPU at a trickle does
not move), one at 1,000 lines/s every 20 ms, one at 10,000 every 5 ms. The first write after
a quiet spell is read at once (the previous read is long past), as with the fixed window.

It is off by default (0: the fixed window), because shorter waits are paid for at both ends.
`make bench` (its latency and latency-paced parts, 2026-12-05, 15 s per rate) measured with 20:
p50 end to end 70 -> 38 ms at 1,000 lines/s, but the agent's CPU 4.5 times and the consumer's
4.4 times as high (more, smaller records: more produce requests, more durable batches), and
p99 124 -> 284 ms; at 10,000 lines/s p50 72 -> 65 ms and p99 126 -> 534 ms. For an operator
who wants the lower median at a moderate rate and has the CPU.
"""

from __future__ import annotations

# The shortest window: at 10,000 lines/s and more a read every 5 ms already brings 50+ lines,
# and a shorter one would only add loop steps.
MIN_WINDOW_S = 0.005


class ReadPacer:
    """Tracks the reads' rate and says how long the next write may wait before it is read."""

    def __init__(self, max_window_s: float, lines_per_read: int) -> None:
        self.max_window_s = max_window_s
        self.lines_per_read = lines_per_read
        self.window_s = max_window_s
        self.last_read = float("-inf")  # the last read that brought bytes
        self._last_lines = float("-inf")  # the last read that brought complete lines

    def read(self, mono: float, lines: int) -> None:
        """Note a read at `mono` that brought bytes, `lines` complete lines among them.

        A read of a part of a line (a long line written in pieces) only restarts the window.
        """
        self.last_read = mono
        if lines <= 0:
            return
        gap = mono - self._last_lines
        self._last_lines = mono
        if self.lines_per_read > 0 and gap > 0:
            want = self.lines_per_read * gap / lines  # the time `lines_per_read` lines take
            self.window_s = min(self.max_window_s, max(MIN_WINDOW_S, want))

    def delay(self, now: float) -> float:
        """Seconds to wait before reading (<= 0: read now)."""
        return self.last_read + self.window_s - now

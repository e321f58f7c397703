"""How long a write waits before the agent reads it: the read coalescing window.

Every read costs the same fixed work (a loop step, a record, a produce request, an ack to
apply) whatever it brings, so a trickle of one-line writes read one by one would cost a read
per line. Waiting a fixed `read_coalesce_ms` (100 ms) after the previous read bounds that cost,
but adds 50 ms on average to every line, also at rates where each read would bring plenty.

With `read_coalesce_lines` (default 20), the window follows the rate: a read should bring
about that many lines. At the last read's rate (its lines over the time since the read before
it) that takes `lines / rate`; the window is that, kept between MIN_WINDOW_S and
`read_coalesce_ms`. So a file written at 200 lines/s or less is still read every 100 ms (the CPU
at a trickle does not move), one at 500 lines/s every 40 ms, at 1,000 lines/s and more every
20 ms. The first write after a quiet spell is read at once (the previous read is long past).
0 turns it off: the fixed window, for an operator who wants the least CPU above a trickle.

Shorter waits are paid for at both ends: more, smaller records, so more produce requests and
more durable batches at the consumer. `make bench` (2026-12-05 22:32, the latency and
latency-fixed parts, 15 s per rate) measured at 1,000 lines/s: p50 end to end 65.5 -> 21.5 ms,
the agent's CPU 1.9 -> 6.5 % of a core, the consumer's 7.9 -> 19 %; at 10,000 lines/s p50
64.1 -> 19.2 ms, at 50,000 68.7 -> 23.2 ms. A 5 ms floor (tried first, in a 10 s A/B with a
busy neighbour) saturated the agent's produce path at 10,000 lines/s and its median went up
again (63 ms against 23 ms with 20 ms).
"""

from __future__ import annotations

# The shortest window: at 1,000 lines/s and more a read every 20 ms already brings 20+ lines; a
# 5 ms floor cost more CPU per line than it saved in delay (see the module docstring).
MIN_WINDOW_S = 0.02


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

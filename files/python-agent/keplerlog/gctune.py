"""Fewer and cheaper garbage collections for a process that allocates a few objects per record.

Why: the consumer makes several container objects per record (librdkafka's message, its
header list and tuples, the record passed to the router) and holds a whole batch of them at a
time. CPython's cyclic collector then ran a young collection every 700 allocations and, every
hundredth of those, a full one over everything the process holds: the modules and client
libraries loaded at start and the batch in flight. That was 15 % of the librdkafka consumer's
busy CPU samples (py-spy --native, 2026-12-07), all of it under the GIL the writer thread
needs. Records hold no reference cycles, so those collections found next to nothing.

`settle()` is called once the process has started: a last full collection, then
`gc.freeze()` moves what survives (the code and configuration kept for the process's life) out
of the collector's sight, and the young generation's threshold goes from 700 to
`YOUNG_THRESHOLD`. Cycles are still collected, less often: the memory they hold in between is
bounded by that many objects.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle(young: int = YOUNG_THRESHOLD) -> None:
    """Freeze what the start-up made and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)

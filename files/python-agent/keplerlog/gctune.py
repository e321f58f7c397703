"""Keep the cyclic garbage collector's full collections off what start-up made.

Why: the consumer makes several container objects per record (librdkafka's message, its
header list and tuples, the record passed to the router), so CPython's collector runs often,
and each of its full collections walked everything the process holds: the modules and client
libraries loaded at start as well as the batch in flight. Collections were 15 % of the
librdkafka consumer's busy CPU samples (py-spy --native, 2026-12-07), all of it under the GIL
the writer thread needs.

`settle()`, called once the process has started, runs a last full collection and then
`gc.freeze()`s what survives (the code and configuration kept for the process's life): later
collections leave it out. The thresholds stay CPython's: raising the young generation's from
700 to 50,000 saved little more and let kafka-python's reference cycles hold their fetch
buffers longer (the kafka-python consumer's peak RSS went from 408-470 MB to 842 MB in the
same A/B, bench_consumer.py, 2 GB, 2026-12-07).
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then freeze what survives: full collections no longer walk it."""
    gc.collect()
    gc.freeze()

"""Keep the agent's resident memory close to what it actually holds, and its buffers cheap.

The agent moves megabytes through short-lived buffers on two threads: a file read (up to
`tailer.READ_CHUNK`, 512 KiB), the record joined from it, the producer's copy of that record
(librdkafka copies it in the calling thread) and its compressed batch. With glibc's defaults
that memory tends to stay resident after it is freed: each thread gets its own malloc arena, and
the mmap threshold rises dynamically after large frees, so later large buffers come from the
heap and fragment it. Three settings keep that in check:

* a fixed mmap threshold just above the read path's buffers (MMAP_THRESHOLD): reads, records and
  the producer's copies come from the heap and are reused, while anything larger (kafka-python's
  batches, a record with a held long line) is mmapped and returned to the kernel on free. With
  a 64 KiB threshold every 256 KiB buffer was a fresh mapping: page faults were a third of the
  agent's CPU shipping 2 KB lines (bench_profile). 320 KiB against 64 KiB, alone, in bench_peers'
  harness (5 alternating rounds, 2 KB lines, 256 KiB reads then): 1.38x the MB/s (median;
  0.75-1.56), peak RSS 1.5-3 MB higher;
* a trim threshold of two reads (TRIM_THRESHOLD): a fixed mmap threshold also fixes glibc's
  trim threshold at its 128 KiB default, so freeing a 512 KiB read at the top of a heap gave
  the pages back to the kernel (sbrk, or a shrink of a thread's heap) and the next read faulted
  them in again, 96 page faults per read. Keeping up to 1 MiB free at each heap's top ends
  that: in bench_profile (2 KB lines, perf over every thread, 2 runs each, alternating) page
  faults fell from 10.3-10.8 % of the agent's CPU samples to 2.6-3.2 %. The cost is at most
  1 MiB per arena of freed memory kept resident (peak RSS in bench_peers' harness: +0-1 MB);
* two arenas, plenty for two busy threads.

No effect (and no error) on a libc without mallopt. The other large, fixed part of the resident
set is code: see `keplerlog.lazyinit`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 576 * 1024  # above a 512 KiB read plus a held line of up to 64 KiB
TRIM_THRESHOLD = 1024 * 1024  # two 512 KiB reads stay mapped at a heap's top


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD, arenas: int = 2, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Apply the glibc malloc settings above; return False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, trim_threshold),
            (_M_ARENA_MAX, arenas),
        )
    )
    if not ok:
        log.debug("mallopt not applied")
    return ok

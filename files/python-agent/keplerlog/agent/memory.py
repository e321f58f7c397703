"""Keep the agent's resident memory close to what it actually holds, and its buffers cheap.

The agent moves megabytes through short-lived buffers on two threads: a file read (up to
`tailer.READ_CHUNK`, 512 KiB), the record joined from it, the producer's copy of that record
(librdkafka copies it in the calling thread) and its compressed batch. With glibc's defaults
that memory tends to stay resident after it is freed: each thread gets its own malloc arena, and
the mmap threshold rises dynamically after large frees, so later large buffers come from the
heap and fragment it. Two settings keep that in check:

* a fixed mmap threshold just above the read path's buffers (MMAP_THRESHOLD): reads, records and
  the producer's copies come from the heap and are reused, while anything larger (kafka-python's
  batches, a record with a held long line) is mmapped and returned to the kernel on free. With
  a 64 KiB threshold every 256 KiB buffer was a fresh mapping: page faults were a third of the
  agent's CPU shipping 2 KB lines (bench_profile). 320 KiB against 64 KiB, alone, in bench_peers'
  harness (5 alternating rounds, 2 KB lines, 256 KiB reads then): 1.38x the MB/s (median;
  0.75-1.56), peak RSS 1.5-3 MB higher;
* two arenas, plenty for two busy threads.

No effect (and no error) on a libc without mallopt. The other large, fixed part of the resident
set is code: see `keplerlog.lazyinit`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 576 * 1024  # above a 512 KiB read plus a held line of up to 64 KiB


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, arenas: int = 2) -> bool:
    """Apply the glibc malloc settings above; return False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))
    if not ok:
        log.debug("mallopt not applied")
    return ok

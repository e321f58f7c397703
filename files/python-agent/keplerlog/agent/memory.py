"""Keep the agent's resident memory close to what it actually holds.

The agent moves megabytes through short-lived buffers (file reads, record payloads, kafka-python
batches and their compressed copies) on two threads. With glibc's defaults that memory tends to
stay resident after it is freed: each thread gets its own malloc arena, and the mmap threshold
rises dynamically after large frees, so later large buffers come from the heap and fragment it.
A fixed 64 KiB mmap threshold returns large buffers to the kernel on free, and two arenas are
plenty for two busy threads. No effect (and no error) on a libc without mallopt.

The other large, fixed part of the resident set is code: see `keplerlog.lazyinit`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 64 * 1024, arenas: int = 2) -> bool:
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

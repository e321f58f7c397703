"""Lower the agent's CPU and I/O priority so it never competes with the application."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# ioprio_set(2): which = IOPRIO_WHO_PROCESS, class in the top bits (IOPRIO_CLASS_SHIFT = 13).
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS = {"best-effort": 2, "idle": 3}


def apply(nice: int, ionice: str) -> None:
    """Apply `nice` (0..19, added to the current niceness) and an ionice class; warn on failure."""
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("cannot renice by %d: %s", nice, exc)
    if ionice in _IOPRIO_CLASS:
        number = _SYS_IOPRIO_SET.get(platform.machine())
        if number is None:
            log.warning("ionice not supported on %s", platform.machine())
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prio = _IOPRIO_CLASS[ionice] << 13 | (7 if ionice == "best-effort" else 0)
        if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, prio) != 0:
            log.warning("cannot set ionice %s: %s", ionice, os.strerror(ctypes.get_errno()))

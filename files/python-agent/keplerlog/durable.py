"""Crash-safe file updates shared by the agent (checkpoint), the consumer (journal) and prune.

A rename is only durable once its directory is fsynced, and a replaced file is only complete
if it was fsynced before the rename: every state file of kepler-log is written this way, so
that a power cut or `kill -9` leaves either the old or the new content, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, payload: bytes, mode: int = 0o644, sync_dir: bool = True) -> None:
    """Replace `path` with `payload` atomically: temp file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)

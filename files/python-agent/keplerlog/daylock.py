"""The lock that keeps retention away from a day file a consumer may still append to.

Every consumer holds a shared `flock` on each day file for as long as it has it open for
appending; `keplerlog-prune` compresses or deletes a file only under an exclusive, non-blocking
`flock`, and skips the file (until its next run) when a consumer holds it. Without this a
consumer catching up a multi-day backlog kept appending, and committing, to a file retention had
already compressed and unlinked: those lines were gone.

The writer locks *after* opening, so it re-checks that its descriptor is still the file at that
path (retention may have unlinked it between the open and the lock) and opens again if not.
Files are opened read-write because on NFS `flock` is emulated with POSIX locks, which need read
access for a shared and write access for an exclusive lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable


def lock_shared(fd: int, path: str) -> bool:
    """Take the writer's shared lock; False if the path no longer names this file (reopen)."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    return _still_at(fd, path)


def open_locked_shared(opener: Callable[[], int], path: str, attempts: int = 5) -> int:
    """Open with `opener` and take the shared lock, reopening while retention removed the file."""
    for _ in range(attempts):
        fd = opener()
        try:
            if lock_shared(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"{path}: removed again on each of {attempts} opens")


def try_lock_exclusive(path: str) -> int | None:
    """Open `path` and take retention's exclusive lock; None if a writer holds it (busy).

    The caller keeps the returned descriptor open (holding the lock) while it compresses or
    unlinks, and closes it afterwards. Symlinks are not followed.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if not _still_at(fd, path):  # replaced meanwhile: leave it to the next run
        os.close(fd)
        return None
    return fd


def _still_at(fd: int, path: str) -> bool:
    mine = os.fstat(fd)
    if mine.st_nlink == 0:
        return False
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

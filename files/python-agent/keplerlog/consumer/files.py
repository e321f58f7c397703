"""Append-only day files: bounded cache of O_APPEND handles, fsync, rollback, path guard.

All disk writes of the data files go through `FileOps` so that tests can inject failures (a
disk that is full for a while) without root privileges or a tiny file system.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keplerlog import daylock
from keplerlog.durable import fsync_dir

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Read-write although only appended to: the shared flock (daylock.py) needs read access on NFS.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")


def parallel(func: Callable[[int], None], fds: list[int]) -> None:
    """Run fsync-like calls concurrently, re-raising the first error after all have finished.

    fsync releases the GIL, and the file system can merge concurrent journal commits.
    """
    if len(fds) <= 1:
        for fd in fds:
            func(fd)
        return
    errors = [f.exception() for f in [_POOL.submit(func, fd) for fd in fds]]
    for error in errors:
        if error is not None:
            raise error


class DiskFullError(OSError):
    """A write or fsync failed with ENOSPC/EDQUOT; the caller rolled back and must retry later."""


class UnsafePathError(ValueError):
    """A relative path would resolve outside the root (`..`, absolute, symlink out of root)."""


@dataclass
class FileOps:
    """The system calls used on data files; replaced in tests to simulate a full disk."""

    write: Callable[[int, memoryview], int] = field(default=os.write)
    fsync: Callable[[int], None] = field(default=os.fsync)
    ftruncate: Callable[[int, int], None] = field(default=os.ftruncate)


def make_dirs(root: str, rel_dir: str) -> None:
    """Create the directories of `rel_dir` below root one by one, fsyncing each new entry."""
    current = root
    for part in [p for p in rel_dir.split("/") if p]:
        child = os.path.join(current, part)
        try:
            os.mkdir(child, 0o755)
        except FileExistsError:
            pass
        else:
            fsync_dir(current)
        current = child


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(root: str, rel: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open root/rel walking one component at a time, never following a symlink below root.

    The PathGuard decides once per path; this is what makes the actual open safe even if a
    directory was swapped for a symlink after that check (a symlink anywhere on the way fails
    with UnsafePathError). With O_CREAT, missing directories are created (each new entry
    fsynced). Returns the fd and whether the file was created.
    """
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"path {rel!r} is not a plain relative path")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                else:
                    os.fsync(dir_fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"path {rel!r}: {part!r} is a symlink or not a directory") from exc
                raise
            os.close(dir_fd)
            dir_fd = child
        try:
            os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            existed = True
        except FileNotFoundError:
            existed = False
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"path {rel!r} is a symlink") from exc
            raise
        return fd, not existed
    finally:
        os.close(dir_fd)


class PathGuard:
    """Checks that a relative path stays inside root after normalisation and symlink resolution.

    Names are already validated (names.py); this is the second, independent line of defence
    required because a layout, a future field or a planted symlink could still point outside.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._ok: set[str] = set()

    def forget(self) -> None:
        """Drop the cache of checked paths (after an open found a symlink the check missed)."""
        self._ok.clear()

    def check(self, rel: str) -> None:
        """Raise UnsafePathError unless root/rel is strictly inside root."""
        if rel in self._ok:
            return
        if rel.startswith("/") or "\x00" in rel:
            raise UnsafePathError(f"path {rel!r} is not relative")
        full = os.path.normpath(os.path.join(self.root, rel))
        if not full.startswith(self.root + os.sep):
            raise UnsafePathError(f"path {rel!r} leaves the root")
        # No existing component below root may be a symlink (open_beneath() refuses them too),
        # so a planted link cannot lead out of the root or onto another service's files.
        current = self.root
        for part in rel.split("/"):
            current = os.path.join(current, part)
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    raise UnsafePathError(f"path {rel!r}: {part!r} is a symlink")
            except FileNotFoundError:
                break
        if len(self._ok) > 100_000:
            self._ok.clear()
        self._ok.add(rel)


@dataclass
class _Handle:
    fd: int
    used: float
    dirty: bool = False


class FileCache:
    """LRU cache of append handles, at most `max_open` open, idle ones closed after `idle_s`.

    Eviction fsyncs a dirty handle first, so bounding the handles never weakens durability.
    """

    def __init__(
        self, root: str, max_open: int = 256, idle_s: float = 60.0, ops: FileOps | None = None
    ) -> None:
        self.root = root
        self.max_open = max(1, max_open)
        self.idle_s = idle_s
        self.ops = ops or FileOps()
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._new_dirs: set[str] = set()

    def __len__(self) -> int:
        return len(self._handles)

    def _get(self, rel: str) -> _Handle:
        handle = self._handles.get(rel)
        if handle is not None:
            self._handles.move_to_end(rel)
            handle.used = time.monotonic()
            return handle
        while len(self._handles) >= self.max_open:
            _, old = self._handles.popitem(last=False)
            self._close(old)
        full = os.path.join(self.root, rel)
        created = False

        def opener() -> int:
            nonlocal created
            fd, new = open_beneath(self.root, rel, _OPEN_FLAGS)
            created = created or new
            return fd

        # Held while the handle is open: retention leaves the file alone (daylock.py).
        fd = daylock.open_locked_shared(opener, full)
        if created:
            self._new_dirs.add(os.path.dirname(full))
        handle = _Handle(fd, time.monotonic())
        self._handles[rel] = handle
        return handle

    def _close(self, handle: _Handle) -> None:
        try:
            if handle.dirty:
                self.ops.fsync(handle.fd)
        finally:
            os.close(handle.fd)

    def size(self, rel: str) -> int:
        """Return the size of a file (opening/creating it): the rollback point before a write."""
        return os.fstat(self._get(rel).fd).st_size

    def append(self, rel: str, data: bytes) -> None:
        """Append `data` with O_APPEND; loops on short writes. Raises DiskFullError on ENOSPC."""
        handle = self._get(rel)
        handle.dirty = True
        view = memoryview(data)
        try:
            while view:
                written = self.ops.write(handle.fd, view)
                view = view[written:]
        except OSError as exc:
            raise _classify(exc) from exc

    def sync(self) -> None:
        """Fsync every handle written since the last sync, and the dirs of newly created files."""
        try:
            dirty = [h for h in self._handles.values() if h.dirty]
            parallel(self.ops.fsync, [h.fd for h in dirty])
            for handle in dirty:
                handle.dirty = False
            for parent in sorted(self._new_dirs):
                fsync_dir(parent)
            self._new_dirs.clear()
        except OSError as exc:
            raise _classify(exc) from exc

    def truncate(self, rel: str, size: int) -> None:
        """Roll a file back to `size` (undo a partial or unsynced append) and make it durable."""
        handle = self._get(rel)
        if os.fstat(handle.fd).st_size > size:
            self.ops.ftruncate(handle.fd, size)
            try:
                self.ops.fsync(handle.fd)
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                # A shrink needs no new blocks; the page cache already has it. Only a power
                # loss right now could bring the undone bytes back (as duplicates, not loss).
                log.warning("fsync after rollback of %s failed: %s", rel, exc)
        handle.dirty = False

    def close_idle(self) -> int:
        """Close handles unused for `idle_s`; returns how many were closed."""
        limit = time.monotonic() - self.idle_s
        stale = [rel for rel, h in self._handles.items() if h.used < limit]
        for rel in stale:
            self._close(self._handles.pop(rel))
        return len(stale)

    def close_all(self) -> None:
        """Close (and fsync if dirty) every handle."""
        while self._handles:
            _, handle = self._handles.popitem(last=False)
            self._close(handle)


def _classify(exc: OSError) -> OSError:
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(exc.errno, os.strerror(exc.errno or 0))
    return exc

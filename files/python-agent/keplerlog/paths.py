"""Paths below the data root that untrusted names can never lead out of.

Shared by the consumer (to write) and prune (to recognise what it may touch): the path guard
that checks a relative path once, and `open_beneath()` that makes every actual open safe even if
a directory was swapped for a symlink after the check.
"""

from __future__ import annotations

import errno
import os
import stat

from keplerlog.durable import fsync_dir


class UnsafePathError(ValueError):
    """A relative path would resolve outside the root (`..`, absolute, symlink out of root)."""


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

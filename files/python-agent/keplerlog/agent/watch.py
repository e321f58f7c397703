"""Wake-ups: inotify on the log directories where available, otherwise plain polling.

The main loop blocks here and nowhere else, so an idle agent costs nothing: with inotify it
sleeps until a watched directory reports a change (directory watches also report writes to
the files inside) or until its own deadline; without inotify it sleeps `poll_interval`.
A self-pipe (`Waker`) lets signal handlers and Kafka ack callbacks end the wait early.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIR_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_CHANGE = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ATTRIB
_EVENT = struct.Struct("iIII")


class Waker:
    """Self-pipe: `wake()` is safe from signal handlers and other threads."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        """Make the next (or current) wait return at once."""
        with contextlib.suppress(OSError):
            os.write(self.wfd, b"!")

    def drain(self) -> None:
        """Consume pending wake-ups."""
        try:
            while os.read(self.rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close both ends."""
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(slots=True)
class Wakeup:
    """Why a wait ended; nothing set means the timeout expired.

    `modified`: files may have been written, `paths` says which (inotify names them; empty
    with `overflow`, when events were lost and every file must be looked at); `changed`:
    directory entries changed (rescan the globs); `woken`: the waker fired.
    """

    modified: bool = False
    changed: bool = False
    woken: bool = False
    overflow: bool = False
    paths: set[str] = field(default_factory=set)


class _Inotify:
    """Minimal ctypes binding of inotify(7)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = int(fd)

    def add(self, path: str, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(wd)

    def read(self) -> list[tuple[int, int, bytes]]:
        """Pending events as (watch descriptor, mask, name in the watched directory or b"")."""
        out: list[tuple[int, int, bytes]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            if not buf:
                return out
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                start = pos + _EVENT.size
                out.append((wd, mask, buf[start : start + length].rstrip(b"\0")))
                pos = start + length


class Watcher:
    """Blocks until something may have changed; watches directories, not single files."""

    def __init__(self, waker: Waker, *, use_inotify: bool = True) -> None:
        self.waker = waker
        self._ino: _Inotify | None = None
        self._dirs: dict[str, int] = {}
        self._wds: dict[int, str] = {}
        if use_inotify:
            try:
                self._ino = _Inotify()
            except (OSError, AttributeError) as exc:
                log.warning("inotify unavailable (%s); polling", exc)
        self._poll = select.poll()
        self._poll.register(waker.rfd, select.POLLIN)
        if self._ino is not None:
            self._poll.register(self._ino.fd, select.POLLIN)

    @property
    def inotify(self) -> bool:
        """True when inotify is in use (otherwise the caller must poll)."""
        return self._ino is not None

    def watch_dirs(self, dirs: set[str]) -> bool:
        """Watch these directories (adding new ones, retrying missing ones); True if all watched."""
        if self._ino is None:
            return False
        ok = True
        for path in dirs:
            if path in self._dirs:
                continue
            try:
                wd = self._ino.add(path, DIR_MASK)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                    log.warning("cannot watch %s: %s", path, exc)
                ok = False
                continue
            self._dirs[path] = wd
            self._wds[wd] = path
        return ok

    def watches(self, directory: str) -> bool:
        """Tell whether writes to files directly in `directory` are reported by name."""
        return directory in self._dirs

    def wait(self, timeout: float | None) -> Wakeup:
        """Wait up to `timeout` seconds (None: forever) for file activity or a wake-up."""
        result = Wakeup()
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        try:
            ready = self._poll.poll(ms)
        except InterruptedError:
            ready = []
        for fd, _ in ready:
            if fd == self.waker.rfd:
                self.waker.drain()
                result.woken = True
            elif self._ino is not None and fd == self._ino.fd:
                for wd, mask, name in self._ino.read():
                    if mask & IN_Q_OVERFLOW:
                        result.changed = result.modified = result.overflow = True
                    if mask & IN_IGNORED:
                        path = self._wds.pop(wd, None)
                        if path is not None:
                            self._dirs.pop(path, None)
                        result.changed = True
                    if mask & _CHANGE:
                        result.changed = True
                    if mask & (IN_MODIFY | IN_CLOSE_WRITE):
                        result.modified = True
                        directory = self._wds.get(wd)
                        if directory is not None and name:
                            result.paths.add(os.path.join(directory, os.fsdecode(name)))
        return result

    def close(self) -> None:
        """Release the inotify descriptor."""
        if self._ino is not None:
            os.close(self._ino.fd)
            self._ino = None

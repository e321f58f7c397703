"""One followed file: an open descriptor, its identity, an assembler and its ack state.

Reading uses `pread` at the assembler's offset, so the descriptor has no hidden position to
get out of step. The descriptor stays open after the path is renamed or deleted: the old file
is read to its end and closed only when everything read from it was acknowledged (a failed
send can then still be re-read) and it has been quiet for `close_inactive_s` (a writer that
has not reopened its log yet may still append to the renamed file).

Truncation (copytruncate, `> file`) is detected when the size drops below what was read or,
when the file has meanwhile been rewritten up to or past it, by its content and mtime (see
`TailedFile.truncated`). The file then gets a new identity (new `kl.file`) and is read from 0.
What the old identity had not read yet (or not yet seen acknowledged) is finished from the
rotated copy when one is found (`find_rotated_copy`, `split_off`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keplerlog.agent.acks import AckTracker
from keplerlog.agent.assembler import Assembler, Chunk
from keplerlog.agent.config import InputConfig
from keplerlog.agent.identity import (
    FINGERPRINT_BYTES,
    FileIdentity,
    Fingerprint,
    TailMark,
    new_file_id,
    read_prefix,
)

if TYPE_CHECKING:  # an annotation only
    from keplerlog.agent.checkpoint import FileState

# One read's most: also one record's, and with librdkafka (batches of one record, rdsender.py)
# one request's, so the 5 requests in flight per partition carry up to 2.5 MiB. 512 KiB against
# 256 KiB in bench_peers' harness (3 alternating rounds): 1.54x the MB/s at 2 KB lines (median;
# 1.04-1.61), 1.02x at 20 KB (0.89-1.09), peak RSS 2.5-3 MB higher.
READ_CHUNK = 512 * 1024
# The bytes just before the end of what was read are kept and compared with the file when it
# changed: a rewrite that keeps the first FINGERPRINT_BYTES (a banner, a CSV header) almost never
# also puts the same TAIL_BYTES at the same offset, while log lines a few hundred bytes long
# differ in their timestamps. 256 bytes cover one or two lines; one pread per changed file.
TAIL_BYTES = 256
# A small file modified without growing is taken as rewritten with the same bytes only once its
# size has stayed put this long: an append updates mtime before it extends the size, so a look
# in between sees exactly "mtime moved, size did not" for a few microseconds.
REWRITE_CONFIRM_S = 1.0
ROTATED_SEPARATORS = ".-_"
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz", ".lz4")


def is_rotated_name(name: str, candidate: str) -> bool:
    """Tell whether `candidate` may be an uncompressed rotated copy of the file named `name`.

    `name` + a separator (`.`, `-`, `_`) + a non-empty suffix: `app.log.1`, `app.log-20261124`,
    `app.log.2026-11-24`, `app.log_0`; never a compressed one (`app.log.2.gz`).
    """
    return (
        len(candidate) > len(name) + 1
        and candidate.startswith(name)
        and candidate[len(name)] in ROTATED_SEPARATORS
        and not candidate.endswith(COMPRESSED_SUFFIXES)
    )


def _rotated_files(path: str, skip: frozenset[tuple[int, int]]) -> Iterator[tuple[str, int, os.stat_result]]:
    """Open the regular, non-empty files with a rotated name of `path`, bar the `skip` keys.

    Yields (path, read-only descriptor, stat); the caller closes each descriptor it does not keep.
    """
    directory, name = os.path.split(path)
    try:
        entries = sorted(e.name for e in os.scandir(directory or "."))
    except OSError:
        return
    for entry in entries:
        if not is_rotated_name(name, entry):
            continue
        candidate = os.path.join(directory, entry)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or (st.st_dev, st.st_ino) in skip:
            os.close(fd)
            continue
        yield candidate, fd, st


def _newest(
    found: Iterable[tuple[str, int, os.stat_result]], ok: Callable[[int, os.stat_result], bool]
) -> tuple[str, int, os.stat_result] | None:
    """Keep the newest (ctime) of the `found` files that are `ok`; close every other descriptor."""
    best: tuple[str, int, os.stat_result] | None = None
    for candidate, fd, st in found:
        try:
            keep = (best is None or st.st_ctime_ns > best[2].st_ctime_ns) and ok(fd, st)
        except OSError:
            keep = False
        if not keep:
            os.close(fd)
            continue
        if best is not None:
            os.close(best[1])
        best = (candidate, fd, st)
    return best


def find_rotated_copy(
    path: str,
    fingerprint: Fingerprint,
    min_size: int,
    skip: frozenset[tuple[int, int]] = frozenset(),
    mark: TailMark | None = None,
) -> tuple[str, int, os.stat_result] | None:
    """Find and open the copy copytruncate made of `path` before truncating it.

    A candidate is a regular file next to `path` with a rotated name (`is_rotated_name`), at
    least `min_size` (and 1) bytes long, not one of the `skip` (dev, inode) keys, whose first
    bytes match `fingerprint` (the truncated identity's). Of several, the newest (ctime) wins.
    Returns (path, open read-only descriptor, stat) or None.
    """
    return _newest(
        _rotated_files(path, skip),
        lambda fd, st: (
            st.st_size >= min_size and fingerprint.matches_fd(fd) and (mark is None or mark.matches_fd(fd))
        ),
    )


def find_read_copy(
    path: str,
    prefix: bytes,
    tail: bytes,
    tail_end: int,
    skip: frozenset[tuple[int, int]],
    newer_than_ns: int,
) -> tuple[str, os.stat_result] | None:
    """Find copytruncate's copy of `path` when it ends before what the agent read: (path, stat).

    Lines written between the copy and the truncate and read from the live file put the read
    offset (`tail_end`) past the copy's end, so `find_rotated_copy` (at least the read offset
    long) misses it. Every byte of such a copy was read under the old id already: it has nothing
    to ship, only to be known as a copy, or a glob that matches its name (`app.log*`) ships it
    again from 0 as a new file. A candidate (as in find_rotated_copy, and not one of `skip`) is
    shorter than `tail_end`, changed after `newer_than_ns` (ctime: it was made for this
    truncation), starts with the live file's first bytes `prefix` as far as both go (a copy of
    under FINGERPRINT_BYTES is compared whole), and, where it ends within `tail` (the bytes read
    just before `tail_end`), ends with the same bytes.
    """
    tail_start = tail_end - len(tail)

    def holds_what_was_read(fd: int, st: os.stat_result) -> bool:
        size = st.st_size
        if size >= tail_end or st.st_ctime_ns <= newer_than_ns:
            return False
        head = min(size, len(prefix))
        if not prefix or read_prefix(fd, head) != prefix[:head]:
            return False
        if size > tail_start:
            return os.pread(fd, size - tail_start, tail_start) == tail[: size - tail_start]
        return True

    found = _newest(_rotated_files(path, skip), holds_what_was_read)
    if found is None:
        return None
    os.close(found[1])
    return found[0], found[2]


@dataclass(slots=True)
class Stream:
    """One identity of a file: from its creation (or last truncation) on. Acks are per stream."""

    identity: FileIdentity
    acks: AckTracker
    inflight: int = 0
    records_inflight: int = 0
    # Where shipping of this identity began: 0, or the size at the very first start with
    # `start_at: end` (bytes before it were deliberately not shipped). For the watermarks.
    first: int = 0

    @property
    def file_id(self) -> str:
        """The `kl.file` id of this stream."""
        return self.identity.file_id


@dataclass(slots=True)
class AssemblerSettings:
    """What every file's Assembler needs besides its input's multiline rules."""

    max_record_bytes: int
    max_line_bytes: int
    partial_timeout_s: float


@dataclass(slots=True)
class TailedFile:
    """An open log file being followed."""

    path: str
    fd: int
    inp: InputConfig
    stream: Stream
    assembler: Assembler
    size: int = 0
    prev_size: int = 0
    last_growth: float = 0.0
    detached: bool = False
    finishing: bool = False
    truncations: int = 0
    prefix: bytes = field(default=b"", repr=False)
    # The last TAIL_BYTES bytes before `tail_end`, the furthest offset read from this identity
    # (a rewind after a failed send moves the read offset back, not what was already seen).
    tail: bytes = field(default=b"", repr=False)
    tail_end: int = 0
    mtime_ns: int = 0
    looked: float = 0.0  # monotonic time of the last refresh
    rewrite_due: float | None = None  # see `refresh`
    _acked_mark: TailMark = field(default_factory=TailMark, repr=False)  # see `acked_mark`
    # The state the last checkpoint built (checkpoint.state_of), reused while it is exact.
    saved_state: FileState | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        path: str,
        fd: int,
        st: os.stat_result,
        inp: InputConfig,
        settings: AssemblerSettings,
        *,
        identity: FileIdentity | None,
        offset: int,
        mono: float,
        first: int | None = None,
    ) -> TailedFile:
        """Wrap an already opened descriptor; `identity` None mints a new one.

        `first`: where shipping of a resumed identity began (default: `offset`, a new one's).
        """
        # The fingerprint covers the bytes the file holds now, read or not (files only grow; a
        # resumed identity's were just checked). Of the bytes read only, it was empty until the
        # first read, and so saved by the scan (a new id goes to disk at once): that matched any
        # content, and a file copytruncated while the agent was stopped was resumed under its
        # old id at 0 (the consumer dropped the new first bytes as replays); its copy could not
        # be told from a new file either.
        prefix = read_prefix(fd, FINGERPRINT_BYTES)
        if identity is None:
            identity = FileIdentity(
                new_file_id(st.st_dev, st.st_ino),
                st.st_dev,
                st.st_ino,
                Fingerprint.of(prefix),
            )
        elif len(prefix) > identity.fingerprint.length:
            identity.fingerprint = Fingerprint.of(prefix)
        return cls(
            path=path,
            fd=fd,
            inp=inp,
            stream=Stream(
                identity, AckTracker(offset), first=min(offset, offset if first is None else first)
            ),
            assembler=_assembler(offset, inp, settings),
            size=st.st_size,
            last_growth=mono,
            prefix=prefix,
            tail=_tail_before(fd, offset),
            tail_end=offset,
            mtime_ns=st.st_mtime_ns,
            looked=mono,
        )

    def acked_mark(self) -> TailMark:
        """Return the mark of the TAIL_BYTES before the acknowledged offset, for the state file.

        Computed again only when that offset moved (one pread, or none when it is where reading
        stopped), so a checkpoint of thousands of idle files reads nothing.
        """
        acked = self.stream.acks.acked
        if self._acked_mark.end != acked or (acked and not self._acked_mark.length):
            if acked == self.tail_end and len(self.tail) == min(TAIL_BYTES, acked):
                data = self.tail
            else:
                data = _tail_before(self.fd, acked)
            # Shorter than asked, the file shrank under the agent; not starting with its first
            # bytes, it was truncated and written again, past `acked` already: a truncation the
            # reader is about to see. No mark beats a mark of the new bytes, which hid the
            # rotated copy from the restart that finishes the old id from it (shipped again
            # from 0 as a file of its own).
            whole = len(data) == min(TAIL_BYTES, acked) and (
                data is self.tail or self.stream.identity.fingerprint.matches_fd(self.fd)
            )
            self._acked_mark = TailMark.of(data, acked) if whole else TailMark(acked)
        return self._acked_mark

    # -- reading -----------------------------------------------------------------------------

    @property
    def read_offset(self) -> int:
        """Next byte to read."""
        return self.assembler.read_offset

    @property
    def at_eof(self) -> bool:
        """True when everything the file held at the last stat has been read."""
        return self.read_offset >= self.size

    def refresh(self, mono: float) -> bool:
        """Re-stat the open descriptor (size, mtime, link count); True if size or mtime changed.

        mtime, not ctime: chmod, chown and renames (logrotate's `create`) change ctime, not the
        content. A file read to its end, at most FINGERPRINT_BYTES long, whose mtime moved while
        its size did not, may have been rewritten with the very same bytes (`> app.log` and the
        same output again): no content check can tell, so it is scheduled as rewritten at
        `rewrite_due` unless it grows first (then it was an append caught half-way).
        """
        st = os.fstat(self.fd)
        grew = st.st_size != self.size
        changed = grew or st.st_mtime_ns != self.mtime_ns
        if grew:
            self.last_growth = mono
            self.prev_size = self.size
            self.rewrite_due = None
        elif (
            changed
            and self.rewrite_due is None
            and not self.detached
            and 0 < self.read_offset == st.st_size <= FINGERPRINT_BYTES
        ):
            self.rewrite_due = mono + REWRITE_CONFIRM_S
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.looked = mono
        if st.st_nlink == 0:
            self.detached = True
        return changed

    def truncated(self, check_fingerprint: bool) -> bool:
        """Tell whether the file was truncated (and maybe rewritten) since it was read.

        Cheap checks always: the size is below what was read, or a same-bytes rewrite was
        confirmed (`refresh`). With `check_fingerprint` (the file changed, or the periodic
        sweep), the content too: the fingerprint of the first bytes, and the TAIL_BYTES before
        the end of what was read. Each is one pread; the tail catches a rewrite that kept the
        first FINGERPRINT_BYTES and grew back past the read offset before the agent looked.

        Not detectable, by design of the file system rather than of the agent: a rewrite whose
        bytes up to the read offset are the ones already read and which already grew past it
        (any size, mtime and content then look exactly like an append). What the consumer
        rebuilds is still the file as it is; only the repeated bytes are not shipped again.
        """
        if self.size < max(self.read_offset, self.tail_end):
            return True
        if self.rewrite_due is not None and self.looked >= self.rewrite_due and not self.detached:
            return True
        if not check_fingerprint:
            return False
        fp = self.stream.identity.fingerprint
        if fp.length > 0 and not fp.matches_fd(self.fd):
            return True
        if self.tail_end > fp.length and self.tail:
            return os.pread(self.fd, len(self.tail), self.tail_end - len(self.tail)) != self.tail
        return False

    def split_off(self, fd: int, st: os.stat_result, settings: AssemblerSettings, mono: float) -> TailedFile:
        """Move the current stream to its rotated copy `fd` (call `restart` next).

        The returned file carries on the same `kl.file` id, acks and assembler (held bytes
        included) at the same read offset, so the consumer sees a seamless continuation; it is
        detached, so it is closed once read to its end, quiet and fully acknowledged. The
        identity takes the copy's device and inode (what a restart finds it by).
        """
        old = self.stream
        old.identity = FileIdentity(old.file_id, st.st_dev, st.st_ino, old.identity.fingerprint)
        copy = TailedFile(
            path=self.path,
            fd=fd,
            inp=self.inp,
            stream=old,
            assembler=self.assembler,
            size=st.st_size,
            prev_size=st.st_size,
            last_growth=mono,
            detached=True,
            prefix=self.prefix,
            # the copy may end before what was read from the live file (bytes written between
            # the copy and the truncate): its own bytes at the read offset are its tail
            tail=_tail_before(fd, self.read_offset),
            tail_end=self.read_offset,
            mtime_ns=st.st_mtime_ns,
            looked=mono,
        )
        self.assembler = _assembler(0, self.inp, settings)
        return copy

    def restart(self, settings: AssemblerSettings) -> list[tuple[Stream, Chunk]]:
        """Start a new stream at offset 0 after truncation; return the old stream's held bytes."""
        old = self.stream
        held = [(old, c) for c in self.assembler.flush()]
        st = os.fstat(self.fd)
        self.prefix = read_prefix(self.fd, FINGERPRINT_BYTES)  # see TailedFile.open
        self.stream = Stream(
            FileIdentity(
                new_file_id(st.st_dev, st.st_ino),
                st.st_dev,
                st.st_ino,
                Fingerprint.of(self.prefix),
            ),
            AckTracker(0),
        )
        self.assembler = _assembler(0, self.inp, settings)
        self.tail = b""
        self.tail_end = 0
        self.rewrite_due = None
        self.truncations += 1
        self.finishing = False
        self.size = st.st_size
        self.prev_size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        return held

    def read(self, budget: int, wall: float, mono: float) -> tuple[list[Chunk], int, int]:
        """Read up to `budget` bytes at the read offset; return chunks, bytes and lines read."""
        want = min(budget, READ_CHUNK, max(0, self.size - self.read_offset))
        if want <= 0:
            return [], 0, 0
        offset = self.read_offset
        data = os.pread(self.fd, want, offset)
        if not data:
            return [], 0, 0
        have = len(self.prefix)
        if have < FINGERPRINT_BYTES and offset <= have < offset + len(data):
            # the prefix may run ahead of the read offset (taken when the identity began)
            self.prefix += data[have - offset : FINGERPRINT_BYTES - offset]
            self.stream.identity.fingerprint = Fingerprint.of(self.prefix)
        end = offset + len(data)
        if end > self.tail_end:  # offset <= tail_end: bytes before tail_end were read already
            if end - self.tail_end >= TAIL_BYTES:
                self.tail = data[-TAIL_BYTES:]
            else:
                self.tail = (self.tail + data[self.tail_end - offset :])[-TAIL_BYTES:]
            self.tail_end = end
        before = self.assembler.newlines
        chunks = self.assembler.feed(data, wall, mono)
        return chunks, len(data), self.assembler.newlines - before

    def rewind(self, offset: int) -> None:
        """Re-read from `offset` (a record starting there failed); held bytes are dropped."""
        self.assembler.rewind(offset)
        self.finishing = False

    # -- closing -----------------------------------------------------------------------------

    def idle_for(self, mono: float) -> float:
        """Seconds since the file last grew."""
        return mono - self.last_growth

    def fully_acked(self) -> bool:
        """Everything read from the current stream is acknowledged and nothing is held."""
        return (
            self.assembler.held == 0
            and self.stream.inflight == 0
            and self.stream.acks.acked >= self.read_offset
        )

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _tail_before(fd: int, offset: int) -> bytes:
    """Read the (up to) TAIL_BYTES bytes of an open file just before `offset`."""
    start = max(0, offset - TAIL_BYTES)
    return os.pread(fd, offset - start, start) if offset > start else b""


def _assembler(offset: int, inp: InputConfig, settings: AssemblerSettings) -> Assembler:
    return Assembler(
        offset,
        max_record_bytes=settings.max_record_bytes,
        max_line_bytes=settings.max_line_bytes,
        partial_timeout_s=settings.partial_timeout_s,
        multiline=inp.multiline,
        one_line_per_record=inp.one_line_per_record,
    )

"""The file set: which files the agent follows, and under which identity.

Filebeat calls this part the prospector. It owns discovery and identity so that the reader and
the ledger only ever deal with open files: matching the globs (the rescans, the directories
inotify watches), opening a file under the identity it had (the saved state of the previous
run, the `closed` registry of files shipped to their end and closed), telling copies of
followed files apart (copytruncate's `app.log.1` is not a new file) and finishing the old
identity from such a copy after a truncation, following files rotated away to their end and
closing them, closing idle files, and the descriptor budget (`open_limit`, `waiting`).

Identity decisions all need the same remembered state (saved, closed, finished, copies); kept
here, one place answers "have we seen this file, and up to where?". The same place therefore
knows when a file id ends and which of its bytes can never be shipped (truncated before they
were read, deleted before the file got a descriptor, rotated away while the agent was stopped):
it tells the watermarks' book (watermarks.py), which accounts for them to the consumer's audit.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import logging
import os
import resource
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from keplerlog.agent import checkpoint
from keplerlog.agent.config import AgentConfig, InputConfig, glob_base
from keplerlog.agent.identity import FileIdentity, FileKey, TailMark, fingerprint_of, read_prefix
from keplerlog.agent.metrics import Counters
from keplerlog.agent.tailer import (
    COMPRESSED_SUFFIXES,
    ROTATED_SEPARATORS,
    AssemblerSettings,
    TailedFile,
    find_read_copy,
    find_rotated_copy,
    is_rotated_name,
)
from keplerlog.agent.watch import Watcher
from keplerlog.agent.watermarks import Book, Ended, unknown_file_id

if TYPE_CHECKING:
    from keplerlog.agent.ledger import Ledger

log = logging.getLogger("keplerlog.agent")  # one logger for the agent loop (see ledger.py)

RESCAN_S = 1.0
# With inotify reporting every create, move and write in the log directories by name (and an
# overflow of its queue forcing a rescan at once), the periodic full rescan is only a safety
# net: thousands of idle files must not cost a glob and a stat of each one every second. At
# 10,000 files one rescan takes about 50 ms, most of an idle agent's CPU (1.35 % of a core with
# one every 10 s in the files bench): every 30 s.
RESCAN_WATCHED_S = 30.0
# A file with a followed file's rotated name that holds the start of its first bytes, but fewer
# than its fingerprint covers, may be a copy logrotate is still writing: judged at a rescan this
# soon (its writes also wake one), not shipped as a new file and then once more as the copy.
UNDECIDED_RESCAN_S = 0.2
# ... for this long at most: a file that stays a prefix (an empty stray `app.log.1`) is then
# followed as a new file, instead of a rescan of every glob five times a second for ever.
UNDECIDED_MAX_S = 10.0
# A copy that ends before what was read is known as one only if made this recently (ctime): it
# was made for the truncation just noticed, not a stray file with the same first bytes.
READ_COPY_MAX_AGE_S = 300.0
FD_RESERVE = 64  # descriptors left to Kafka's sockets, the state file, inotify and metrics
NO_FDS = (errno.EMFILE, errno.ENFILE)


def _still_holds(path: str, state: checkpoint.FileState) -> bool:
    """Tell whether the file at `path` is still the one `state` describes (first and marked bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return state.matches_fd(fd, os.fstat(fd).st_size)
    except OSError:
        return False
    finally:
        os.close(fd)


def open_file_limit(configured: int) -> int:
    """`max_open_files`, lowered to stay FD_RESERVE below the process's RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


def glob_matches(path: str, pattern: str) -> bool:
    """Tell whether glob.glob(pattern) could have returned `path`.

    Wildcards stay inside one path component, as in glob: fnmatch alone lets `/var/log/*.log`
    match `/var/log/nginx/a.log`, which gave that file the wrong input (and module).
    """
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted, strict=True)
    )


class FileSet:
    """Finds, opens, identifies and closes the followed files (`files`)."""

    def __init__(
        self,
        cfg: AgentConfig,
        counters: Counters,
        watcher: Watcher,
        ledger: Ledger,
        files: dict[FileKey, TailedFile],
        book: Book,
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self.watcher = watcher
        self.ledger = ledger  # chunks still held by a file that is truncated or finished
        self.files = files
        self.book = book  # ends of file ids and lost bytes, for the watermarks
        self.settings = AssemblerSettings(
            max_record_bytes=cfg.kafka.max_record_bytes,
            max_line_bytes=cfg.limits.max_line_bytes,
            partial_timeout_s=cfg.limits.partial_line_timeout_ms / 1000,
        )
        self.saved = checkpoint.load(cfg.state_file, first_unknown_at_offset=cfg.start_at == "end")
        self._saved_ids = {(st.dev, st.ino): file_id for file_id, st in self.saved.items()}
        self._by_path: dict[str, TailedFile] | None = None  # followed files by path, during a scan
        # The directory watched for each glob (glob_base: the same one the state file must stay
        # out of); with each glob's files directly in it, inotify names every write by file.
        self.watch_dirs = {str(glob_base(pattern)) for inp in cfg.inputs for pattern in inp.paths}
        self._flat_globs = all(glob_base(p) == Path(p).parent for inp in cfg.inputs for p in inp.paths)
        self.watched_all = False  # every glob's files sit directly in a watched directory
        self._dir_of: dict[str, tuple[str, str]] = {}
        # Files shipped to their end and closed that a glob still matches (e.g. `app.log*` over
        # rotated copies): resumed by identity when they grow, never shipped again from 0.
        self.closed: dict[FileKey, checkpoint.FileState] = {}
        # A file was opened under a newly minted id since the agent last saved its state (see
        # `scan`: the id must be on disk before the file's first record is sent).
        self.minted = False
        # Of those, the ones finished after a rotation (read on for close_inactive_s past it):
        # when their path moves on, only bytes written since count. A file closed for idleness
        # is followed where it went, like a live file that rotates (see `_finish_moved`).
        self.finished: set[FileKey] = set()
        # The modification time (ns) of each closed file when it was closed. "Same inode, same
        # size" is not "unchanged": a file system reuses a deleted file's inode at once, and a
        # new file of the old one's size would be skipped unread. With the mtime too it is
        # opened, its first bytes checked, and read from 0. Missing (closed files loaded from
        # the state file): opened once to check.
        self._closed_mtime: dict[FileKey, int] = {}
        # Copies of followed files (copytruncate's `app.log.1` matched by the glob before the
        # truncation was noticed): their bytes are the followed file's, shipped under its id.
        # With each one's mtime when it was judged: a changed file is judged again (logrotate
        # frees a copy's inode when it compresses it, and the next copy may get it).
        # Kept in the state file: after a restart the file a copy came from may be truncated and
        # written again, and the copy would no longer be told from a new file.
        self.copies: dict[FileKey, int] = checkpoint.load_copies(cfg.state_file)
        # Files that may be copies still being written, left for a rescan, and since when.
        self._undecided: dict[FileKey, float] = {}
        self._deferred = False  # one was left by this scan: the next one comes soon
        self.open_limit = open_file_limit(cfg.limits.max_open_files)
        self.waiting = 0  # files a glob matches that wait for a free descriptor slot
        # Those files (path, input, size at the last rescan): one deleted before it got a slot
        # was never read, and its size is all the agent can say about what it held.
        self.unopened: dict[FileKey, tuple[str, InputConfig, int]] = {}
        self._blind = False  # the last rescan could not list a directory (no descriptors)
        self.fresh_start = not self.saved and not cfg.state_file.exists()
        self.next_scan = 0.0
        self._warned: set[str] = set()
        # Bumped whenever the followed files change (a scan, a file opened, split off, retired):
        # the reader's index of which files need a look is then rebuilt by a pass over all.
        self.generation = 0

    def scan(self, mono: float) -> None:
        """Match the globs; open new files; mark files whose path moved on as detached.

        Saves the state at once if a file got a new `kl.file` id. A new file's id is minted when
        it is first opened (identity.new_file_id: it includes the time). Saved only at the next
        checkpoint, a kill -9 before it lost the id: the restart read the file again from 0 under
        another id, and the consumer, which drops re-sent bytes per id, wrote them twice (molecule
        image: a rotation, then a kill within a second; or the scan of the drain on stop, cut
        short by a supervisor's SIGKILL). Saved before any of its records is sent, a restart
        re-sends under the same id. One save per scan that opened new files, however many; a
        file truncated in place saves its new id the same way (`truncated`).
        """
        self._match(mono)
        if self.minted:
            self.checkpoint()
            self.minted = False

    def checkpoint(self, *, final: bool = False) -> None:
        """Write the state file: the followed files, the remembered ones and the copies."""
        self.ledger.checkpoint(self.remembered(), final=final, copies=self.copies)

    def remembered(self) -> dict[FileKey, checkpoint.FileState]:
        """Files known but not open, for the state file: `closed`, and saved ones not matched yet.

        The saved states of the previous run join the others at the first rescan that can list
        the directories. A checkpoint before it (no descriptor to list with, or a test's order)
        wrote the state file without them, and a kill then re-shipped every file from 0.
        """
        if not self.saved:
            return self.closed
        out = {(s.dev, s.ino): s for s in self.saved.values()}
        out.update(self.closed)
        return out

    def _match(self, mono: float) -> None:
        self.next_scan = mono + RESCAN_S
        self.generation += 1
        self._close_idle(mono)
        dirs = self.watch_dirs
        if not self._can_list(dirs):
            return  # glob would see nothing: that must not read as "every file was deleted"
        self.watched_all = self.watcher.watch_dirs(dirs) and self._flat_globs
        found: dict[FileKey, tuple[str, InputConfig, int, int]] = {}
        for inp in self.cfg.inputs:
            for pattern in inp.paths:
                for path in sorted(glob.glob(pattern)):
                    if path.endswith(COMPRESSED_SUFFIXES):
                        continue  # compressed rotations: their lines were shipped before
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.setdefault((st.st_dev, st.st_ino), (path, inp, st.st_size, st.st_mtime_ns))
        for key, f in self.files.items():
            if key not in found and not f.detached:
                f.detached = True
                self.counters.rotations += 1
                log.info("%s rotated or deleted; finishing it", f.path)
        vanished = [
            k for k in self.unopened if k not in found and k not in self.files and k not in self.closed
        ]
        if vanished:
            self._unopened_gone(vanished)
        gone = [k for k in self.closed if k not in found]
        if gone:
            idle = [self.closed[k] for k in gone if k not in self.finished]
            self._finish_moved(mono, idle, "while closed", follow_at_end=True)
            done = [self.closed[k] for k in gone if k in self.finished]
            self._finish_moved(mono, done, "after it was finished", follow_at_end=False)
            for key in gone:
                # Still here: not followed where it went (deleted, or moved out of reach), nothing
                # to resume. Opened again by `_finish_moved`: it left `closed` then.
                state = self.closed.pop(key, None)
                if state is not None:
                    size = self.unopened[key][2] if key in self.unopened else 0
                    self._end(state, size, "deleted", state.path)
        self.finished &= self.closed.keys()
        if len(self._closed_mtime) > len(self.closed):
            self._closed_mtime = {k: m for k, m in self._closed_mtime.items() if k in self.closed}
        self.copies = {k: m for k, m in self.copies.items() if found.get(k, (0, 0, 0, None))[3] == m}
        self._deferred = False
        if self._undecided:
            self._undecided = {k: t for k, t in self._undecided.items() if k in found}
        unopened: dict[FileKey, tuple[str, InputConfig, int]] = {}
        waiting = 0
        self._by_path = self._live_by_path()  # kept up to date by open()
        try:
            for key, (path, inp, size, mtime) in found.items():
                if key in self.files or key in self.copies:
                    continue  # (copies whose mtime changed were dropped above: judged again)
                done = self.closed.get(key)
                if done is not None and size == done.offset and self._closed_mtime.get(key) == mtime:
                    continue  # shipped to its end and unchanged: not even opened
                if len(self.files) >= self.open_limit or not self.open(path, inp, mono):
                    waiting += 1
                    unopened[key] = (path, inp, size)
        finally:
            self._by_path = None
            self.unopened = unopened
        if waiting and not self.waiting:
            log.warning(
                "%d files wait for a descriptor slot (%d open, limit %d); idle files are closed "
                "after %.0f s to make room",
                waiting,
                len(self.files),
                self.open_limit,
                self.cfg.limits.close_inactive_s,
            )
        self.waiting = waiting
        if self.watched_all and not waiting:
            # idle files are closed at a rescan (_close_idle): a close_idle_s shorter than the
            # safety net's period shortens the period, or a file would stay open 30 s too long
            idle_s = self.cfg.limits.close_idle_s
            self.next_scan = mono + (min(RESCAN_WATCHED_S, idle_s) if idle_s else RESCAN_WATCHED_S)
        if self._deferred:
            self.next_scan = min(self.next_scan, mono + UNDECIDED_RESCAN_S)
        if self.saved:
            # Saved files a glob still matches that got no descriptor slot have not moved: they
            # wait like files closed for idleness (resumed by identity, kept in the state file),
            # not "finished" past the limit as if rotated while the agent was stopped.
            waits = {
                key: s
                for s in self.saved.values()
                if (key := (s.dev, s.ino)) in found and key not in self.files
            }
            self.closed.update(waits)
            moved = [s for s in self.saved.values() if (s.dev, s.ino) not in waits]
            self._finish_moved(mono, moved, "while stopped", follow_at_end=True)
            for s in moved:
                if s.file_id in self.saved:  # not found where it went: `open` takes what it finds
                    self._end(s, 0, "rotated", s.path)
            self.saved.clear()
            self._saved_ids.clear()
        self.fresh_start = False

    def _can_list(self, dirs: set[str]) -> bool:
        """Tell whether the watched directories can be listed; count a lack of descriptors."""
        for directory in sorted(dirs):
            try:
                with os.scandir(directory):
                    pass
            except OSError as exc:
                if exc.errno not in NO_FDS:
                    continue  # a missing directory is an ordinary empty match
                self.counters.fd_exhausted += 1
                if not self._blind:
                    log.error("cannot list %s: %s; rescan skipped, nothing marked deleted", directory, exc)
                self._blind = True
                return False
        self._blind = False
        return True

    def norm_dir(self, path: str) -> tuple[str, str]:
        """Return a followed path as inotify names it, and its directory (cached per path)."""
        cached = self._dir_of.get(path)
        if cached is None:
            norm = os.path.normpath(path)
            cached = (norm, os.path.dirname(norm))
            if len(self._dir_of) > 4 * self.open_limit:
                self._dir_of.clear()
            self._dir_of[path] = cached
        return cached

    def _close_idle(self, mono: float) -> None:
        """Close live files read to their end, acknowledged and quiet; remember them by identity.

        Quiet means `close_idle_s`, or `close_inactive_s` while other files wait for a slot.
        """
        limit = self.cfg.limits.close_inactive_s if self.waiting else self.cfg.limits.close_idle_s
        if not limit:
            return
        for key, f in list(self.files.items()):
            if f.detached or not f.at_eof or f.idle_for(mono) < limit or not f.fully_acked():
                continue
            self._retire(key, f)

    def _retire(self, key: FileKey, f: TailedFile) -> None:
        """Close a file shipped to its end and remember it by identity (see `closed`)."""
        try:
            self._closed_mtime[key] = os.fstat(f.fd).st_mtime_ns
        except OSError:
            self._closed_mtime.pop(key, None)  # unknown: opened and checked at the next rescan
        self.closed[key] = checkpoint.state_of(f)  # reads its mark: before the close
        f.close()
        del self.files[key]
        self.generation += 1
        if f.detached:
            self.finished.add(key)
        else:
            self.finished.discard(key)
        self.counters.files_closed += 1
        self.book.note(key)  # closed or finished: the audit hears it at once

    def open(self, path: str, inp: InputConfig, mono: float, *, detached: bool = False) -> bool:
        """Open and follow a file; False when it cannot be opened now (retried at a rescan)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in NO_FDS:
                self.counters.fd_exhausted += 1
                log.debug("cannot open %s: %s; it waits for a free descriptor", path, exc.strerror)
                return False
            if path not in self._warned:
                self._warned.add(path)
                self.counters.errors += 1
                log.error("cannot open %s: %s", path, exc.strerror)
            return True
        self._warned.discard(path)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            os.close(fd)
            return True
        identity, offset, first = None, 0, None
        known = [self.saved[self._saved_ids[key]]] if key in self._saved_ids else []
        if not known and key in self.closed:
            known = [self.closed[key]]
        for state in known:
            self.saved.pop(state.file_id, None)
            self._saved_ids.pop(key, None)
            self.closed.pop(key, None)
            if state.matches_fd(fd, st.st_size):
                identity, offset, first = state.identity(), state.offset, state.first
            elif key in self.finished:  # shipped to its end after a rotation: a new file
                log.info("%s: inode of finished %s reused; reading from 0", path, state.file_id)
            else:
                log.info("%s: inode reused or truncated since it was last read; reading from 0", path)
                self._finish_from_copy(path, inp, state, mono)
        if identity is None or offset == 0:  # nothing shipped under a resumed id: judged like a new file
            judged = self._copy_of_followed(path, fd)
            if judged:
                os.close(fd)
                self._undecided.pop(key, None)
                self.copies[key] = st.st_mtime_ns
                log.info("%s is a copy of a followed file; not shipped again", path)
                return True
            if judged is not None:
                since = self._undecided.setdefault(key, mono)
                if mono - since < UNDECIDED_MAX_S:
                    os.close(fd)
                    self._deferred = True
                    log.debug("%s may be a copy still being written; judged at the next rescan", path)
                    return True
                log.info(
                    "%s held only a followed file's first bytes for %.0f s: a file of its own",
                    path,
                    mono - since,
                )
        self._undecided.pop(key, None)
        if identity is None and self.fresh_start and self.cfg.start_at == "end":
            offset = st.st_size
        f = TailedFile.open(
            path, fd, st, inp, self.settings, identity=identity, offset=offset, mono=mono, first=first
        )
        self.minted |= identity is None
        f.detached = detached
        self.files[key] = f
        self.generation += 1
        if self._by_path is not None and not (detached and path in self._by_path):
            self._by_path[path] = f
        self.counters.files_opened += 1
        log.info("following %s (%s) from offset %d", path, f.stream.file_id, offset)
        return True

    def _finish_from_copy(
        self, path: str, inp: InputConfig, state: checkpoint.FileState, mono: float
    ) -> None:
        """Read the rest of a file truncated while not followed from its rotated copy.

        copytruncate while the agent was stopped (or the file closed for idleness). The copy
        continues the old `kl.file` id at the acknowledged offset (no gap, no duplicate).
        Without a copy the rest is gone: the bytes the agent had seen (the saved `seen`) are
        counted lost; how many more there were is unknown (the agent never saw them).
        """
        ident = state.identity()
        found = find_rotated_copy(path, ident.fingerprint, state.offset, frozenset(self.files), state.mark)
        if found is None:
            log.warning(
                "%s was truncated while not followed and no rotated copy holds its rest: any bytes "
                "of %s after offset %d were not shipped (%d of them seen)",
                path,
                state.file_id,
                state.offset,
                max(0, state.seen - state.offset),
            )
            self._end(state, 0, "truncated", path, inp, warn=False)
            return
        copy_path, fd, st = found
        key = (st.st_dev, st.st_ino)
        moved = FileIdentity(ident.file_id, st.st_dev, st.st_ino, ident.fingerprint)
        f = TailedFile.open(
            path,
            fd,
            st,
            inp,
            self.settings,
            identity=moved,
            offset=state.offset,
            mono=mono,
            first=state.first,
        )
        f.detached = True
        self.files[key] = f
        self.generation += 1
        self.copies.pop(key, None)
        self.counters.files_opened += 1
        log.info(
            "%s was truncated while not followed; reading the rest of %s from %s (offset %d of %d)",
            path,
            state.file_id,
            copy_path,
            state.offset,
            st.st_size,
        )

    def _copy_of_followed(self, path: str, fd: int) -> bool | None:
        """Tell whether a new file is a rotated copy (by name and first bytes) of a followed one.

        True: a copy. False: perhaps one still being written (it holds fewer bytes than the
        followed file's fingerprint covers, and they are its first ones; an empty file too):
        decide at a later rescan. None: not a copy.
        Looked up by the names it could be a copy of (`app.log.1` -> `app.log`), not by walking
        every followed file: opening thousands of files must not cost files x files.
        """
        directory, name = os.path.split(path)
        by_path = self._by_path if self._by_path is not None else self._live_by_path()
        maybe = False
        for i, char in enumerate(name):
            if char not in ROTATED_SEPARATORS or i == 0:
                continue
            f = by_path.get(os.path.join(directory, name[:i]))
            if f is None or not is_rotated_name(name[:i], name):
                continue
            fp = f.stream.identity.fingerprint
            if fp.length == 0:
                continue
            head = read_prefix(fd, fp.length)
            if len(head) == fp.length:
                if fingerprint_of(head) == fp.digest:
                    return True
            elif f.prefix.startswith(head):
                maybe = True
        return False if maybe else None

    def _live_by_path(self) -> dict[str, TailedFile]:
        """Index the followed files by path, the live file where a detached one has the same path.

        A copy split off after a truncation keeps the live file's path (its records carry it)
        and stays followed until read, quiet and acknowledged: a second copytruncate in that
        time must be checked against the live file's first bytes, not the first copy's, or the
        second copy is shipped again from 0 under a new id.
        """
        by_path = {f.path: f for f in self.files.values() if f.detached}
        by_path.update((f.path, f) for f in self.files.values() if not f.detached)
        return by_path

    def _finish_moved(
        self, mono: float, states: list[checkpoint.FileState], why: str, *, follow_at_end: bool
    ) -> None:
        """Finish known files no glob matches any more: found by inode in their directory.

        A file rotated away while the agent was stopped, or while it was closed for idleness,
        may hold lines written after the agent last read it, or get them later: the writer keeps
        its descriptor until it reopens, and the rescan that sees the rename (inotify wakes it at
        once) can come before the writer's last lines. So such a file is followed, even when
        nothing was added yet (`follow_at_end`), for close_inactive_s like any rotated file.
        A file already finished that way is only opened again when it grew. Each directory is
        listed once. An inode is only a hint: the file found must still start with the state's
        first bytes (and hold its marked ones), and a compressed name is never followed, or a
        `.gz` that got a known file's inode after logrotate deleted it was shipped as text.
        """
        by_dir: dict[str, list[checkpoint.FileState]] = {}
        for state in states:
            by_dir.setdefault(os.path.dirname(state.path), []).append(state)
        for directory, group in by_dir.items():
            wanted = {(s.dev, s.ino): s for s in group}
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                state = wanted.get((st.st_dev, st.st_ino))
                if state is None or st.st_size < state.offset or entry.name.endswith(COMPRESSED_SUFFIXES):
                    continue
                if st.st_size == state.offset and not follow_at_end:
                    continue
                if not _still_holds(entry.path, state):
                    continue
                # the module's input when no glob matches the name it was last followed under
                # (`app.log.1`, itself found here after the rename): its rest is still its own
                inp = self.input_of(state.path) or next(
                    (i for i in self.cfg.inputs if i.module == state.module), None
                )
                if inp is not None:
                    log.info("%s was rotated to %s %s; finishing it", state.path, entry.path, why)
                    self.open(entry.path, inp, mono, detached=True)

    def finish_detached(self, mono: float, keys: Iterable[FileKey] | None = None) -> None:
        """Close rotated/deleted files once read to the end, quiet, and fully acknowledged.

        Of the files `keys` names (the reader's `looking()`: every detached file is among them,
        so a loop step does not visit every open file), or of all.
        """
        for key in list(self.files if keys is None else keys):
            f = self.files.get(key)
            if f is None or not f.detached or not f.at_eof:
                continue
            if f.idle_for(mono) < self.cfg.limits.close_inactive_s:
                continue
            try:
                # The size is the last read pass's, and none runs while Kafka is away: a rotated
                # file its writer still appends to (`create` without a reopen) looked finished
                # and was closed with its last lines unread.
                if os.fstat(f.fd).st_size > f.size:
                    continue
            except OSError:
                pass
            if not f.finishing:
                f.finishing = True
                self.ledger.send(f, f.stream, f.assembler.flush())
            if f.fully_acked():
                self._retire(key, f)
                log.info("finished %s (%s) at offset %d", f.path, f.stream.file_id, f.stream.acks.acked)

    def truncated(self, f: TailedFile, mono: float) -> bool:
        """Restart a truncated file at 0 under a new id; return True if a rotated copy was found.

        The old id's unread rest (and any of its records that still fail) is then read from the
        copy, under the old id and offsets: nothing lost, no gap, no duplicate.
        """
        self.counters.truncations += 1
        self.generation += 1
        old = f.stream
        offset, seen = f.read_offset, f.prev_size
        # the bytes before the read offset tell the copy from an older rotation with the same start
        mark = TailMark.of(f.tail, f.tail_end) if f.tail and f.tail_end == offset else None
        found = find_rotated_copy(f.path, old.identity.fingerprint, offset, frozenset(self.files), mark)
        if found is not None:
            # Split off even when nothing is left to read from it: closed when finished, it is
            # remembered as the old id's (`closed`, the state file). Closed at once instead, a
            # glob that matches it (`app.log*`) found it as a new file, read it from 0.
            path, fd, st = found
            self.copies.pop((st.st_dev, st.st_ino), None)
            self.files[(st.st_dev, st.st_ino)] = f.split_off(fd, st, self.settings, mono)
            log.info(
                "%s truncated; reading the rest of %s from %s (offset %d of %d)",
                f.path,
                old.file_id,
                path,
                offset,
                st.st_size,
            )
            offset = max(offset, st.st_size)
        else:
            self._know_read_copy(f, offset)
            # The old id ends here: its last account goes out once its held bytes come back.
            self.book.end(old.file_id, Ended(f.path, f.inp.module, old.first, max(seen, offset), 0, old))
        held = f.restart(self.settings)
        self.ledger.send(f, old, [c for _, c in held])
        # The new id goes to disk before its first record is sent (see `scan` for a new
        # file): a kill -9 after that record's ack would otherwise re-send the bytes under yet
        # another id on restart, duplicates the consumer cannot drop. Truncations are rare.
        self.checkpoint()
        if seen > offset:
            self.counters.lost_bytes += self.book.lose(old.file_id, offset, seen, "truncated")
            log.warning(
                "%s: %d bytes of %s were truncated before they were read", f.path, seen - offset, old.file_id
            )
            if found is not None:
                self.book.note((found[2].st_dev, found[2].st_ino))  # the copy carries the old id on
        log.info("%s truncated; now %s from offset 0", f.path, f.stream.file_id)
        return found is not None

    def _know_read_copy(self, f: TailedFile, offset: int) -> None:
        """Know copytruncate's copy as the truncated file's when it ends before what was read.

        Lines written between the copy and the truncate that were read from the live file put
        the read offset past the copy's end (tailer.find_read_copy). Unknown, a glob matching
        its name shipped it again from 0 as a new file. Only files the agent knows nothing of
        are candidates: any other file a glob matches was opened, judged or remembered already.
        """
        if not f.tail or f.tail_end != offset:
            return  # read back after a failed send: the bytes just before the offset are unknown
        known = frozenset(self.files) | self.copies.keys() | self.closed.keys() | self._saved_ids.keys()
        since = time.time_ns() - int(READ_COPY_MAX_AGE_S * 1e9)
        found = find_read_copy(f.path, f.prefix, f.tail, f.tail_end, known, since)
        if found is None:
            return
        path, st = found
        key = (st.st_dev, st.st_ino)
        self._undecided.pop(key, None)
        self.copies[key] = st.st_mtime_ns
        log.info(
            "%s truncated; %s (%d bytes) holds only bytes of %s read before (to %d): not shipped again",
            f.path,
            path,
            st.st_size,
            f.stream.file_id,
            offset,
        )

    # -- for the watermarks ------------------------------------------------------------------

    def input_of(self, path: str) -> InputConfig | None:
        """Return the input whose globs match `path` (None: none does any more)."""
        return next(
            (i for i in self.cfg.inputs if any(glob_matches(path, p) for p in i.paths)),
            None,
        )

    def _end(
        self,
        state: checkpoint.FileState,
        size: int,
        reason: str,
        path: str,
        inp: InputConfig | None = None,
        *,
        warn: bool = True,
    ) -> None:
        """End a known file id that is not followed: its bytes [acknowledged, seen) are lost.

        `size` is a size seen since the state was saved (a file that waited for a slot); `reason`
        is from record.LOSS_REASONS.
        Counted in `lost_bytes` and told to the book, whose watermark says `gone` (or
        `finished` when nothing was lost).
        """
        seen = max(state.seen, size, state.offset)
        lost = self.book.lose(state.file_id, state.offset, seen, reason)
        self.counters.lost_bytes += lost
        if lost and warn:
            log.warning(
                "%s (%s): %d bytes seen and never shipped (offset %d of %d): %s",
                path,
                state.file_id,
                lost,
                state.offset,
                seen,
                "rotated away while the agent was stopped, not found" if reason == "rotated" else "deleted",
            )
        inp = inp or self.input_of(state.path)
        module = state.module or (inp.module if inp is not None else self.cfg.module)
        self.book.end(state.file_id, Ended(path, module, state.first, seen, state.offset))

    def _unopened_gone(self, keys: list[FileKey]) -> None:
        """Files that waited for a slot and left the globs before they got one: never read.

        Their whole size is lost; a watermark under `w:{dev}:{ino}` (no fingerprint without
        reading) says so: `rotated` if the inode is still in its directory under a name no glob
        matches, else `deleted`.
        """
        by_dir: dict[str, set[FileKey]] = {}
        for key in keys:
            by_dir.setdefault(os.path.dirname(self.unopened[key][0]), set()).add(key)
        present: set[FileKey] = set()
        for directory, wanted in by_dir.items():
            inodes = {ino for _, ino in wanted}
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.inode() not in inodes:
                            continue  # no stat for the other files of the directory
                        try:
                            k = (entry.stat(follow_symlinks=False).st_dev, entry.inode())
                        except OSError:
                            continue
                        if k in wanted:
                            present.add(k)
            except OSError:
                continue
        for key in keys:
            path, inp, size = self.unopened[key]
            if size <= 0:
                continue
            reason = "rotated" if key in present else "deleted"
            file_id = unknown_file_id(key)
            self.counters.lost_bytes += self.book.lose(file_id, 0, size, reason)
            log.warning(
                "%s (%d bytes) left the globs (%s) before a descriptor slot was free: never shipped",
                path,
                size,
                reason,
            )
            self.book.end(file_id, Ended(path, inp.module, 0, size, 0))

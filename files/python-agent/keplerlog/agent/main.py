"""`keplerlog-agent --config agent.yml`: the loop that ties the agent's parts together.

Single process, single reading thread (kafka-python adds its I/O thread; metrics add one when
enabled). The loop: apply Kafka results -> rescan globs when directories changed -> read what
files grew by, within the memory budget -> flush timed-out partial lines and events -> close
finished rotated files -> checkpoint -> block in the watcher until something happens.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import glob
import logging
import os
import queue
import resource
import signal
import stat
import sys
import time
from pathlib import Path
from types import FrameType

from keplerlog.agent import checkpoint, memory, priority
from keplerlog.agent.assembler import Chunk
from keplerlog.agent.config import AgentConfig, ConfigError, InputConfig, glob_base, load
from keplerlog.agent.identity import FileIdentity
from keplerlog.agent.metrics import AgentMetrics, Counters, FileGauge, Snapshot, summary
from keplerlog.agent.sender import Sender
from keplerlog.agent.tailer import (
    COMPRESSED_SUFFIXES,
    ROTATED_SEPARATORS,
    AssemblerSettings,
    Stream,
    TailedFile,
    find_rotated_copy,
    is_rotated_name,
)
from keplerlog.agent.watch import Waker, Watcher
from keplerlog.record import Batch

log = logging.getLogger("keplerlog.agent")

FileKey = tuple[int, int]
RESCAN_S = 1.0
FINGERPRINT_CHECK_S = 1.0
# With inotify reporting every create, move and write in the log directories by name, the
# periodic full rescan and fingerprint sweep are only a safety net: thousands of idle files
# must not cost a glob, a stat and a read of each one every second.
RESCAN_WATCHED_S = 10.0
FINGERPRINT_SWEEP_WATCHED_S = 10.0
SEND_BACKOFF_S = 1.0
RENEW_BACKOFF_MAX_S = 30.0
FD_RESERVE = 64  # descriptors left to Kafka's sockets, the state file, inotify and metrics
NO_FDS = (errno.EMFILE, errno.ENFILE)


def open_file_limit(configured: int) -> int:
    """`max_open_files`, lowered to stay FD_RESERVE below the process's RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


class Agent:
    """Follows the configured files and ships them to Kafka, at least once."""

    def __init__(self, cfg: AgentConfig, *, use_inotify: bool = True) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.waker = Waker()
        self.watcher = Watcher(self.waker, use_inotify=use_inotify)
        self.sender = Sender(cfg, self.waker.wake)
        self.files: dict[FileKey, TailedFile] = {}
        self.settings = AssemblerSettings(
            max_record_bytes=cfg.kafka.max_record_bytes,
            max_line_bytes=cfg.limits.max_line_bytes,
            partial_timeout_s=cfg.limits.partial_line_timeout_ms / 1000,
        )
        self.saved = checkpoint.load(cfg.state_file)
        self._saved_ids = {(st.dev, st.ino): file_id for file_id, st in self.saved.items()}
        self._by_path: dict[str, TailedFile] | None = None  # followed files by path, during a scan
        # inotify names the files written (`_dirty`); a sweep looks at every open file instead
        # (no inotify, lost events, a file outside a watched directory, the periodic check).
        self._dirty: set[str] = set()
        self._sweep = True
        self._watched_all = False  # every glob's files sit directly in a watched directory
        self._flat_globs = all(glob_base(p) == Path(p).parent for inp in cfg.inputs for p in inp.paths)
        self._dir_of: dict[str, tuple[str, str]] = {}
        # Files shipped to their end and closed that a glob still matches (e.g. `app.log*` over
        # rotated copies): resumed by identity when they grow, never shipped again from 0.
        self.closed: dict[FileKey, checkpoint.FileState] = {}
        # Of those, the ones finished after a rotation (read on for close_inactive_s past it):
        # when their path moves on, only bytes written since count. A file closed for idleness
        # is followed where it went, like a live file that rotates (see `_finish_moved`).
        self._finished: set[FileKey] = set()
        # Copies of followed files (copytruncate's `app.log.1` matched by the glob before the
        # truncation was noticed): their bytes are the followed file's, shipped under its id.
        self.copies: set[FileKey] = set()
        self.open_limit = open_file_limit(cfg.limits.max_open_files)
        self.waiting = 0  # files a glob matches that wait for a free descriptor slot
        self._blind = False  # the last rescan could not list a directory (no descriptors)
        self.fresh_start = not self.saved and not cfg.state_file.exists()
        self.stopping = False
        self.inflight = 0
        self._last_state: list[checkpoint.FileState] | None = None
        self._acked_unsaved = False  # an ack advanced since the last checkpoint
        self._next_checkpoint = 0.0
        self._next_log = time.monotonic() + cfg.metrics.log_interval_s
        self._next_scan = 0.0
        self._next_fp_check = 0.0
        self._last_read = 0.0
        self._send_backoff_until = 0.0
        self._next_connect = 0.0
        self._renew_backoff = SEND_BACKOFF_S
        self._warned: set[str] = set()
        self._paused_memory = False  # the last read pass stopped at the buffer budget
        self.metrics = AgentMetrics(self.counters, self._snapshot)

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: stop reading, drain, checkpoint, exit 0."""
        self.stopping = True
        self.waker.wake()

    def run(self) -> int:
        """Run until `request_stop`; return the exit status."""
        if self.cfg.metrics.port:
            self.metrics.start(self.cfg.metrics.host, self.cfg.metrics.port)
        try:
            while not self.stopping and not self.sender.connect():
                self.watcher.wait(2.0)
            if not self.stopping:
                self._scan(time.monotonic())
            while not self.stopping:
                self._step()
            self._shutdown()
        finally:
            for f in self.files.values():
                f.close()
            self.watcher.close()
            self.waker.close()
            self.metrics.stop()
        return 0

    def _step(self) -> None:
        mono, wall = time.monotonic(), time.time()
        # a producer renewed while no broker answered (rare): try again every few seconds
        if not self.sender.connected and mono >= self._next_connect and not self.sender.connect():
            self._next_connect = time.monotonic() + 2 * SEND_BACKOFF_S
        self._results()
        if mono >= self._next_scan:
            self._scan(mono)
        self._read_all(wall, mono)
        for f in list(self.files.values()):
            self._send(f, f.stream, f.assembler.poll(wall, mono))
        self._finish_detached(mono)
        if mono >= self._next_checkpoint:
            self._checkpoint()
            self._next_checkpoint = mono + self.cfg.limits.checkpoint_interval_ms / 1000
        if self.cfg.metrics.log_interval_s and mono >= self._next_log:
            log.info("stats %s", summary(self.counters, self._gauges(), self._global_gauges()))
            self._next_log = mono + self.cfg.metrics.log_interval_s
        woke = self.watcher.wait(self._timeout(time.monotonic()))
        self._dirty |= woke.paths
        self._sweep = self._sweep or woke.overflow
        if woke.changed:
            self._next_scan = 0.0
        coalesce = self.cfg.limits.read_coalesce_ms / 1000
        if woke.modified and coalesce and not self.stopping:
            # A trickle of one-line writes would cost one read, one record and one produce
            # request per line; reading at most every read_coalesce_ms turns it into one.
            # An idle file is read at once (the previous read is long past).
            delay = self._last_read + coalesce - time.monotonic()
            if delay > 0:
                # But notice a truncation at once: copytruncate's copy may be compressed and
                # removed right after it, and the unread tail is only in that copy.
                self._check_truncations(time.monotonic())
                delay = self._last_read + coalesce - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def _timeout(self, mono: float) -> float:
        limit = self.cfg.limits.poll_interval_ms / 1000 if not self.watcher.inotify else RESCAN_S
        deadlines = [self._next_scan, self._next_fp_check]
        # Idle with every file watched by name, nothing else needs a look: sleep until an event
        # or one of the deadlines. Otherwise (polling, bytes in flight, Kafka away, a send
        # backing off) look again within a second, as always.
        quiet = self._watched_all and not self.inflight and self.sender.connected
        if not quiet or mono < self._send_backoff_until:
            deadlines.append(mono + limit)
        if self.inflight or self._acked_unsaved or self._last_state is None:
            # an idle agent sleeps long: wake for the checkpoint of its last acks too
            deadlines.append(self._next_checkpoint)
        for f in self.files.values():
            d = f.assembler.next_deadline()
            if d is not None:
                deadlines.append(d)
            if f.detached:
                deadlines.append(f.last_growth + self.cfg.limits.close_inactive_s)
            if f.rewrite_due is not None and f.rewrite_due > mono:
                deadlines.append(f.rewrite_due)  # a look then confirms a same-bytes rewrite
        return max(0.0, min(deadlines) - mono)

    def _shutdown(self) -> None:
        """Read every followed file to its current end, ship it, wait for the acks, checkpoint.

        supervisord stops the application first and the agent after it, so the application's
        last lines (often why it stopped) were written after the agent's last wake-up: they
        are read now, partial last lines included (shipped as they are). Whatever is not
        acknowledged within `shutdown_timeout_s` is logged with its size and re-read from the
        checkpoint at the next start.
        """
        limit = self.cfg.limits.shutdown_timeout_s
        deadline = time.monotonic() + limit
        log.info("stopping: reading every file to its end and shipping it (at most %.0f s)", limit)
        self._results()
        if self.sender.connected:
            self._scan(time.monotonic())  # files created since the last rescan
            self._drain_reads(deadline)
        for f in list(self.files.values()):
            self._send(f, f.stream, f.assembler.flush())
        if self.sender.connected and self.inflight:
            self.sender.flush(timeout=max(0.0, deadline - time.monotonic()))
        while self.inflight and time.monotonic() < deadline:
            self._results()
            if self.inflight:
                self.watcher.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        self._results()
        self._checkpoint()
        pending, unread = self._unacknowledged()
        if pending:
            log.warning(
                "stopping with %d bytes not acknowledged (%d of them not read) in %d files; "
                "they are re-read from the checkpoint at the next start",
                sum(pending.values()),
                unread,
                len(pending),
            )
        self.sender.close(timeout=1)
        log.info("stopped")

    def _drain_reads(self, deadline: float) -> None:
        """Read every file to its end before `deadline`, waiting for acks when the budget is spent."""
        while True:
            self._read_all(time.time(), time.monotonic(), draining=True)
            self._results()
            if all(f.at_eof for f in self.files.values()) or time.monotonic() >= deadline:
                return
            self.sender.poke()
            self.watcher.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._results()

    def _unacknowledged(self) -> tuple[dict[str, int], int]:
        """Bytes per file id between the acknowledged offset and the file's end; and unread bytes."""
        pending: dict[str, int] = {}
        unread = 0
        for f in self.files.values():
            behind = max(f.size, f.read_offset) - f.stream.acks.acked
            if behind > 0:
                pending[f.stream.file_id] = pending.get(f.stream.file_id, 0) + behind
                unread += max(0, f.size - f.read_offset)
        return pending, unread

    # -- files -------------------------------------------------------------------------------

    def _scan(self, mono: float) -> None:
        """Match the globs; open new files; mark files whose path moved on as detached."""
        self._next_scan = mono + RESCAN_S
        self._close_idle(mono)
        dirs = {str(glob_base(pattern)) for inp in self.cfg.inputs for pattern in inp.paths}
        if not self._can_list(dirs):
            return  # glob would see nothing: that must not read as "every file was deleted"
        self._watched_all = self.watcher.watch_dirs(dirs) and self._flat_globs
        found: dict[FileKey, tuple[str, InputConfig, int]] = {}
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
                        found.setdefault((st.st_dev, st.st_ino), (path, inp, st.st_size))
        for key, f in self.files.items():
            if key not in found and not f.detached:
                f.detached = True
                self.counters.rotations += 1
                log.info("%s rotated or deleted; finishing it", f.path)
        gone = [k for k in self.closed if k not in found]
        if gone:
            idle = [self.closed[k] for k in gone if k not in self._finished]
            self._finish_moved(mono, idle, "while closed", follow_at_end=True)
            done = [self.closed[k] for k in gone if k in self._finished]
            self._finish_moved(mono, done, "after it was finished", follow_at_end=False)
            for key in gone:
                self.closed.pop(key, None)  # deleted, or moved and followed: nothing to resume
        self._finished &= self.closed.keys()
        self.copies &= found.keys()
        waiting = 0
        self._by_path = {f.path: f for f in self.files.values()}  # kept up to date by _open()
        try:
            for key, (path, inp, size) in found.items():
                if key in self.files or key in self.copies:
                    continue
                done = self.closed.get(key)
                if done is not None and size == done.offset:
                    continue  # shipped to its end and unchanged: not even opened
                if len(self.files) >= self.open_limit or not self._open(path, inp, mono):
                    waiting += 1
        finally:
            self._by_path = None
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
        if self._watched_all and not waiting:
            self._next_scan = mono + RESCAN_WATCHED_S
        if self.saved:
            self._finish_moved(mono, list(self.saved.values()), "while stopped", follow_at_end=True)
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
        f.close()
        del self.files[key]
        self.closed[key] = self._state_of(f)
        if f.detached:
            self._finished.add(key)
        else:
            self._finished.discard(key)
        self.counters.files_closed += 1

    def _open(self, path: str, inp: InputConfig, mono: float, *, detached: bool = False) -> bool:
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
        identity, offset = None, 0
        known = [self.saved[self._saved_ids[key]]] if key in self._saved_ids else []
        if not known and key in self.closed:
            known = [self.closed[key]]
        for state in known:
            self.saved.pop(state.file_id, None)
            self._saved_ids.pop(key, None)
            self.closed.pop(key, None)
            ident = state.identity()
            if ident.fingerprint.matches_fd(fd) and state.offset <= st.st_size:
                identity, offset = ident, state.offset
            else:
                log.info("%s: inode reused or truncated since it was last read; reading from 0", path)
                self._finish_from_copy(path, inp, state, mono)
        if identity is None and self._copy_of_followed(path, fd):
            os.close(fd)
            self.copies.add(key)
            log.info("%s is a copy of a followed file; not shipped again", path)
            return True
        if identity is None and self.fresh_start and self.cfg.start_at == "end":
            offset = st.st_size
        f = TailedFile.open(path, fd, st, inp, self.settings, identity=identity, offset=offset, mono=mono)
        f.detached = detached
        self.files[key] = f
        if self._by_path is not None:
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
        Without a copy the rest is gone; how much is unknown (the agent never saw it), so it is
        logged, not counted.
        """
        ident = state.identity()
        found = find_rotated_copy(path, ident.fingerprint, state.offset, frozenset(self.files))
        if found is None:
            log.warning(
                "%s was truncated while not followed and no rotated copy holds its rest: any bytes "
                "of %s after offset %d were not shipped",
                path,
                state.file_id,
                state.offset,
            )
            return
        copy_path, fd, st = found
        key = (st.st_dev, st.st_ino)
        moved = FileIdentity(ident.file_id, st.st_dev, st.st_ino, ident.fingerprint)
        f = TailedFile.open(path, fd, st, inp, self.settings, identity=moved, offset=state.offset, mono=mono)
        f.detached = True
        self.files[key] = f
        self.copies.discard(key)
        self.counters.files_opened += 1
        log.info(
            "%s was truncated while not followed; reading the rest of %s from %s (offset %d of %d)",
            path,
            state.file_id,
            copy_path,
            state.offset,
            st.st_size,
        )

    def _copy_of_followed(self, path: str, fd: int) -> bool:
        """Tell whether a new file is a rotated copy (by name and first bytes) of a followed one.

        Looked up by the names it could be a copy of (`app.log.1` -> `app.log`), not by walking
        every followed file: opening thousands of files must not cost files x files.
        """
        directory, name = os.path.split(path)
        by_path = self._by_path if self._by_path is not None else {f.path: f for f in self.files.values()}
        for i, char in enumerate(name):
            if char not in ROTATED_SEPARATORS or i == 0:
                continue
            f = by_path.get(os.path.join(directory, name[:i]))
            if f is None or not is_rotated_name(name[:i], name):
                continue
            fp = f.stream.identity.fingerprint
            if fp.length > 0 and fp.matches_fd(fd):
                return True
        return False

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
        listed once.
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
                if state is None or st.st_size < state.offset:
                    continue
                if st.st_size == state.offset and not follow_at_end:
                    continue
                inp = next(
                    (i for i in self.cfg.inputs if any(fnmatch.fnmatchcase(state.path, p) for p in i.paths)),
                    None,
                )
                if inp is not None:
                    log.info("%s was rotated to %s %s; finishing it", state.path, entry.path, why)
                    self._open(entry.path, inp, mono, detached=True)

    def _finish_detached(self, mono: float) -> None:
        """Close rotated/deleted files once read to the end, quiet, and fully acknowledged."""
        for key, f in list(self.files.items()):
            if not f.detached or not f.at_eof or f.idle_for(mono) < self.cfg.limits.close_inactive_s:
                continue
            if not f.finishing:
                f.finishing = True
                self._send(f, f.stream, f.assembler.flush())
            if f.fully_acked():
                self._retire(key, f)
                log.info("finished %s (%s) at offset %d", f.path, f.stream.file_id, f.stream.acks.acked)

    def _held(self) -> int:
        """Bytes read but held by the assemblers (partial lines, open multiline events)."""
        return sum(f.assembler.held for f in self.files.values())

    def _read_all(self, wall: float, mono: float, *, draining: bool = False) -> None:
        """Read every file that grew, round-robin, until nothing is left or the budget is spent.

        A stop request ends the pass early unless `draining` (the shutdown reads to the end).
        """
        if mono < self._send_backoff_until or not self.sender.connected:
            return
        check_fp = mono >= self._next_fp_check
        if check_fp:
            sweep_s = FINGERPRINT_SWEEP_WATCHED_S if self._watched_all else FINGERPRINT_CHECK_S
            self._next_fp_check = mono + sweep_s
        sweep = draining or check_fp or self._sweep or not self._watched_all
        dirty, self._dirty, self._sweep = self._dirty, set(), False
        self._paused_memory = False
        named: set[str] = set()
        progress = True
        while progress and (draining or not self.stopping):
            progress = False
            self._results()
            held = self._held()  # kept up to date below: O(1) per file, not O(files)
            for f in list(self.files.values()):
                norm, directory = self._norm_dir(f.path)
                if norm in dirty:
                    named.add(norm)
                elif (
                    not sweep
                    and f.at_eof
                    and not f.detached
                    and f.rewrite_due is None
                    and self.watcher.watches(directory)
                ):
                    continue  # read to its end and inotify reported no write since
                try:
                    changed = f.refresh(mono)
                    # Check the content before reading bytes that may belong to a new file.
                    if f.truncated(check_fp or changed):
                        if self._truncated(f, mono):
                            progress = True  # the rotated copy's rest is read in the next pass
                        held = self._held()
                except OSError as exc:
                    self.counters.errors += 1
                    log.error("%s: %s", f.path, exc)
                    continue
                budget = self.cfg.limits.max_buffer_bytes - self.inflight - held
                if budget <= 0:
                    self._sweep = True  # files not looked at yet may have had write events
                    self._paused_memory = True
                    return
                if f.at_eof:
                    continue
                split_before = f.assembler.lines_split
                held_before = f.assembler.held
                try:
                    chunks, nbytes, nlines = f.read(budget, wall, mono)
                except OSError as exc:
                    self.counters.errors += 1
                    log.error("%s: read failed: %s", f.path, exc)
                    continue
                self.counters.lines_split += f.assembler.lines_split - split_before
                held += f.assembler.held - held_before
                if nbytes:
                    progress = True
                    self._last_read = mono
                    self.counters.bytes_read += nbytes
                    self.counters.lines_read += nlines
                    self._send(f, f.stream, chunks)
                if time.monotonic() >= self._send_backoff_until > mono:
                    self._sweep = True
                    return
            if dirty - named:
                self._next_scan = 0.0
            dirty = named = set()
            check_fp = sweep = False
            wall, mono = time.time(), time.monotonic()

    def _norm_dir(self, path: str) -> tuple[str, str]:
        """Return a followed path as inotify names it, and its directory (cached per path)."""
        cached = self._dir_of.get(path)
        if cached is None:
            norm = os.path.normpath(path)
            cached = (norm, os.path.dirname(norm))
            if len(self._dir_of) > 4 * self.open_limit:
                self._dir_of.clear()
            self._dir_of[path] = cached
        return cached

    def _written(self, path: str, dirty: set[str]) -> bool:
        """Tell whether inotify reported a write to `path` (or cannot, outside its directories)."""
        norm, directory = self._norm_dir(path)
        return norm in dirty or not self.watcher.watches(directory)

    def _check_truncations(self, mono: float) -> None:
        """Size/fingerprint check of the files that changed, without reading them."""
        if mono < self._send_backoff_until or not self.sender.connected:
            return
        for f in list(self.files.values()):
            if self._watched_all and not self._sweep and not self._written(f.path, self._dirty):
                continue
            try:
                if f.truncated(f.refresh(mono)):
                    self._truncated(f, mono)
            except OSError as exc:
                self.counters.errors += 1
                log.error("%s: %s", f.path, exc)

    def _truncated(self, f: TailedFile, mono: float) -> bool:
        """Restart a truncated file at 0 under a new id; return True if a rotated copy was found.

        The old id's unread rest (and any of its records that still fail) is then read from the
        copy, under the old id and offsets: nothing lost, no gap, no duplicate.
        """
        self.counters.truncations += 1
        old = f.stream
        offset, seen = f.read_offset, f.prev_size
        found = find_rotated_copy(f.path, old.identity.fingerprint, offset, frozenset(self.files))
        if found is not None and found[2].st_size == offset and f.fully_acked():
            os.close(found[1])  # nothing left to read or to re-read: the copy is not needed
            found = None
        if found is not None:
            path, fd, st = found
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
        held = f.restart(self.settings)
        self._send(f, old, [c for _, c in held])
        if seen > offset:
            self.counters.lost_bytes += seen - offset
            log.warning(
                "%s: %d bytes of %s were truncated before they were read", f.path, seen - offset, old.file_id
            )
        log.info("%s truncated; now %s from offset 0", f.path, f.stream.file_id)
        return found is not None

    # -- Kafka -------------------------------------------------------------------------------

    def _send(self, f: TailedFile, stream: Stream, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            batch = Batch(
                service=self.cfg.service,
                module=f.inp.module,
                host=self.cfg.host,
                path=f.path,
                file_id=stream.file_id,
                offset=chunk.offset,
                lines=chunk.lines,
                ts_ms=chunk.ts_ms,
            )
            size = len(chunk.data)
            try:
                self.sender.send(
                    chunk.data,
                    batch.key(),
                    batch.headers(),
                    (f, stream, chunk.offset, size, chunk.lines, chunk.ts_ms),
                )
            except Exception as exc:
                self.counters.send_errors += 1
                log.warning("%s: send failed at offset %d: %s", f.path, chunk.offset, exc)
                self._send_backoff_until = time.monotonic() + SEND_BACKOFF_S
                self._failed(f, stream, chunk.offset, size)
                return
            self.inflight += size
            stream.inflight += size
            stream.records_inflight += 1
            self.counters.records_sent += 1
            self.counters.lines_sent += chunk.lines
            self.counters.bytes_sent += size
            self.metrics.record_bytes.observe(size)

    def _results(self) -> None:
        """Apply acknowledgements and failures reported by the producer thread."""
        results = self.sender.results
        while True:
            try:
                outcome = results.get_nowait()
            except queue.Empty:
                return
            f, stream, offset, size, lines, ts_ms = outcome.token
            self.inflight -= size
            stream.inflight -= size
            stream.records_inflight -= 1
            if outcome.error is None:
                self.counters.records_acked += 1
                self.counters.lines_acked += lines
                self.counters.bytes_acked += size
                stream.acks.ack(offset, offset + size)
                self.metrics.ack_latency.observe(max(0.0, time.time() - ts_ms / 1000))
                self._acked_unsaved = True
                self._renew_backoff = SEND_BACKOFF_S
            else:
                self.counters.send_errors += 1
                log.warning("%s: record at offset %d failed: %s", f.path, offset, outcome.error)
                self._failed(f, stream, offset, size)
                if self.sender.broken:
                    self._renew_producer(outcome.error)

    def _renew_producer(self, error: BaseException) -> None:
        """Replace a producer that failed for good (sender.py); its records are re-sent.

        Sending again at once would turn a record the broker keeps refusing into a loop of new
        producers and connections: the sends wait first, twice as long each time (up to
        RENEW_BACKOFF_MAX_S) until a record is acknowledged again.
        """
        self.counters.producer_renewals += 1
        log.warning(
            "the Kafka producer stopped for good after %s; replacing it and re-sending every "
            "record not acknowledged in %.0f s",
            error,
            self._renew_backoff,
        )
        if not self.sender.renew():
            self._next_connect = time.monotonic() + self._renew_backoff
        self._send_backoff_until = time.monotonic() + self._renew_backoff
        self._renew_backoff = min(RENEW_BACKOFF_MAX_S, 2 * self._renew_backoff)

    def _failed(self, f: TailedFile, stream: Stream, offset: int, size: int) -> None:
        """Re-read from a failed record's offset (from the rotated copy after a truncation)."""
        if stream is not f.stream or f.fd < 0:
            copy = next((c for c in self.files.values() if c.stream is stream and c.fd >= 0), None)
            if copy is None:
                self.counters.lost_bytes += size
                log.warning(
                    "%s: %d bytes at offset %d of %s lost (truncated)", f.path, size, offset, stream.file_id
                )
                return
            f = copy
        target = max(offset, stream.acks.acked)
        if target < f.read_offset:
            f.rewind(target)
            self.counters.rewinds += 1

    # -- checkpoint and metrics --------------------------------------------------------------

    @staticmethod
    def _state_of(f: TailedFile) -> checkpoint.FileState:
        ident = f.stream.identity
        return checkpoint.FileState(
            file_id=ident.file_id,
            path=f.path,
            dev=ident.dev,
            ino=ident.ino,
            fp_len=ident.fingerprint.length,
            fp_hash=ident.fingerprint.digest,
            offset=f.stream.acks.acked,
        )

    def _checkpoint(self) -> None:
        states = [self._state_of(f) for f in self.files.values()]
        ids = {s.file_id for s in states}
        states += [s for s in self.closed.values() if s.file_id not in ids]
        if states == self._last_state:
            self._acked_unsaved = False
            return
        try:
            checkpoint.save(self.cfg.state_file, states)
        except OSError as exc:
            self.counters.errors += 1
            log.error("cannot write state file %s: %s", self.cfg.state_file, exc)
            return
        self._last_state = states
        self._acked_unsaved = False
        self.counters.checkpoints += 1

    def _gauges(self) -> list[FileGauge]:
        return [
            FileGauge(f.path, f.stream.file_id, f.inp.module, f.size, f.stream.acks.acked)
            for f in list(self.files.values())
        ]

    def _global_gauges(self) -> dict[str, float]:
        return {
            "inflight_bytes": self.inflight,
            "files_open": len(self.files),
            "files_open_limit": self.open_limit,
            "files_waiting": self.waiting,
            "files_closed_known": len(self.closed),
            "kafka_connected": 1 if self.sender.connected else 0,
        }

    def _snapshot(self) -> Snapshot:
        """Return what a scrape shows (called from the metrics thread)."""
        mono = time.monotonic()
        kafka = not self.sender.connected or mono < self._send_backoff_until
        return Snapshot(
            self.cfg.service,
            self._gauges(),
            self._global_gauges(),
            {"memory": self._paused_memory, "kafka": kafka},
        )


def _check_state_dir(cfg: AgentConfig) -> None:
    directory = cfg.state_file.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_file: cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"state_file: directory {directory} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    memory.tune_malloc()  # first: before the big imports and threads allocate
    memory.defer_package_init("kafka")  # the agent only needs kafka.producer (see memory.py)
    parser = argparse.ArgumentParser(prog="keplerlog-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="agent YAML file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--no-inotify", action="store_true", help="poll instead of using inotify")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level == "DEBUG":
        logging.getLogger("kafka").setLevel(logging.DEBUG)  # else: sender.py keeps it quiet
    try:
        cfg = load(args.config)
        _check_state_dir(cfg)
    except ConfigError as exc:
        print(f"keplerlog-agent: config error: {exc}", file=sys.stderr)
        return 2
    priority.apply(cfg.limits.nice, cfg.limits.ionice)
    agent = Agent(cfg, use_inotify=not args.no_inotify)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())

"""Reading: one pass over the followed files that changed, within the memory budget.

Filebeat calls this part the harvester (one per file there; one loop over all files here, as
the agent has a single reading thread). It owns what the agent reads and when: which files a
pass looks at (those inotify named, `dirty`, and those not done, `busy`; or all of them in a
`sweep`), the truncation and
rewrite checks that must come before reading bytes that may belong to a new file, the memory
budget (`max_buffer_bytes` minus the ledger's bytes in flight and the assemblers' held bytes),
and the timed flushes of partial lines and multiline events. Everything read goes straight to
the ledger; a truncation is handed to the file set, which owns identities.

The pass is the agent's hot path (hundreds of thousands of lines a second): the per-file loop
keeps its lookups in locals and does nothing per file that the old single-class loop did not.
With thousands of files open and one of them busy, a pass (and the loop's timeout, the timed
flushes and the finishing of rotated files) costs what changed, not what is open: only a sweep
visits every open file, and sweeps are periodic (FINGERPRINT_SWEEP_WATCHED_S) or follow a change
of the file set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

from keplerlog.agent.config import AgentConfig
from keplerlog.agent.fileset import FileSet
from keplerlog.agent.identity import FileKey
from keplerlog.agent.ledger import Ledger
from keplerlog.agent.metrics import Counters
from keplerlog.agent.tailer import TailedFile
from keplerlog.agent.watch import Watcher

log = logging.getLogger("keplerlog.agent")  # one logger for the agent loop (see ledger.py)

FINGERPRINT_CHECK_S = 1.0
# With inotify naming every written file, the fingerprint sweep of all open files is only a
# safety net: thousands of idle files must not cost a read of each one's first bytes every second.
FINGERPRINT_SWEEP_WATCHED_S = 10.0


def _first_bytes_unsaved(f: TailedFile) -> bool:
    """Tell whether the state file still holds this id with a shorter fingerprint, nothing acked.

    An id is saved when it begins (FileSet.scan), with a fingerprint of the bytes the file held
    then: none for a file created empty. Sent before a save, its first records could reach the
    topic, and after a kill -9 and a copytruncate while the agent was down, the empty
    fingerprint matched the new content: resumed under the old id at 0, the new first bytes were
    dropped by the consumer as replays. So such an id's first records wait for the state save at
    the end of the read round that read them (one save per round of `Reader.read_all`'s loop over
    the files, not one per file), or an earlier one when the round stops early.
    """
    if f.stream.acks.acked:  # the state file is written again with the acknowledged offset
        return False
    saved = f.saved_state  # None: not saved since it was opened (resumed after a restart, say)
    return (
        saved is None
        or saved.file_id != f.stream.file_id
        or saved.fp_len < f.stream.identity.fingerprint.length
    )


def _settled(f: TailedFile, watched: bool) -> bool:
    """Tell whether a file needs no look until inotify names it (its held bytes aside)."""
    return f.at_eof and not f.detached and f.rewrite_due is None and watched


class Reader:
    """Reads what the followed files grew by and hands it to the ledger."""

    def __init__(
        self,
        cfg: AgentConfig,
        counters: Counters,
        watcher: Watcher,
        fileset: FileSet,
        ledger: Ledger,
        stopping: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self.watcher = watcher
        self.fileset = fileset
        self.ledger = ledger
        self.files: dict[FileKey, TailedFile] = fileset.files
        self._stopping = stopping  # a stop request ends a pass early (unless draining)
        # inotify names the files written (`dirty`); a sweep looks at every open file instead
        # (no inotify, lost events, a file outside a watched directory, the periodic check).
        self.dirty: set[str] = set()
        self.sweep = True
        # The open files a pass must look at although inotify named none of them: not read to
        # their end, holding a partial line or an open event, detached, a rewrite to confirm,
        # or in a directory inotify does not watch. Exact after a sweep (rebuilt), kept up to
        # date for every file a pass looks at; stale once the file set changed (`generation`),
        # which makes the next pass a sweep.
        self.busy: set[FileKey] = set()
        self._names: dict[FileKey, tuple[str, str]] = {}  # as inotify names it, and its directory
        self._by_name: dict[str, list[FileKey]] = {}
        self._generation = -1  # the file set's generation `busy` and the names were built for
        self.next_fp_check = 0.0
        self.paused_memory = False  # the last read pass stopped at the buffer budget

    def held(self) -> int:
        """Bytes read but held by the assemblers (partial lines, open multiline events)."""
        return sum(f.assembler.held for _, f in self.looking())

    def looking(self) -> Iterator[tuple[FileKey, TailedFile]]:
        """Yield the open files that may have work or a deadline: `busy`, or all if it is stale."""
        files = self.files
        if self._generation != self.fileset.generation:
            yield from list(files.items())
            return
        for key in list(self.busy):
            f = files.get(key)
            if f is not None:
                yield key, f

    def _index(self) -> None:
        """Name every open file as inotify names it, at a sweep.

        Every file is `busy` until the sweep's visit finds it done: a sweep cut short (at the
        memory cap) leaves the rest busy.
        """
        norm_dir = self.fileset.norm_dir
        self._names = {key: norm_dir(f.path) for key, f in self.files.items()}
        by_name: dict[str, list[FileKey]] = {}
        for key, (norm, _) in self._names.items():
            by_name.setdefault(norm, []).append(key)
        self._by_name = by_name
        self.busy = set(self._names)
        self._generation = self.fileset.generation

    def _to_look_at(self, sweep: bool, dirty: set[str], named: set[str]) -> list[tuple[FileKey, TailedFile]]:
        """Return the files a pass visits.

        All of them in a sweep; else the `busy` ones and those inotify named in `dirty` (the
        names found are added to `named`).
        """
        if sweep:
            self._index()
            named.update(n for n in dirty if n in self._by_name)
            return list(self.files.items())
        return self._busy_and_named(dirty, named)

    def _busy_and_named(self, dirty: set[str], named: set[str]) -> list[tuple[FileKey, TailedFile]]:
        """Return the `busy` files and those inotify named in `dirty` (their names go to `named`)."""
        keys = set(self.busy)
        by_name = self._by_name
        for norm in dirty:
            found = by_name.get(norm)
            if found:
                named.add(norm)
                keys.update(found)
        files = self.files
        return [(k, f) for k in keys if (f := files.get(k)) is not None]

    def read_all(self, wall: float, mono: float, *, draining: bool = False) -> None:
        """Read every file that grew, round-robin, until nothing is left or the budget is spent.

        A stop request ends the pass early unless `draining` (the shutdown reads to the end).
        """
        ledger = self.ledger
        if mono < ledger.send_backoff_until or not ledger.sender.connected:
            return
        fileset = self.fileset
        check_fp = mono >= self.next_fp_check
        if check_fp:
            sweep_s = FINGERPRINT_SWEEP_WATCHED_S if fileset.watched_all else FINGERPRINT_CHECK_S
            self.next_fp_check = mono + sweep_s
        sweep = draining or check_fp or self.sweep or not fileset.watched_all
        sweep = sweep or self._generation != fileset.generation
        dirty, self.dirty, self.sweep = self.dirty, set(), False
        self.paused_memory = False
        named: set[str] = set()
        counters, send = self.counters, ledger.send
        watches = self.watcher.watches
        max_buffer_bytes = self.cfg.limits.max_buffer_bytes
        progress = True
        # Records held for one state save per round (see _first_bytes_unsaved), their files (by
        # id(): later records of one wait behind them) and bytes (within the memory budget).
        first: list[tuple[TailedFile, list]] = []
        holding: set[int] = set()
        first_bytes = 0

        def send_first() -> None:
            nonlocal first_bytes
            fileset.checkpoint()
            for held_f, held_chunks in first:
                send(held_f, held_f.stream, held_chunks)
            first.clear()
            holding.clear()
            first_bytes = 0

        while progress and (draining or not self._stopping()):
            progress = False
            ledger.results()
            sweep = sweep or self._generation != fileset.generation  # e.g. a copy split off
            held = self.held()  # kept up to date below: O(1) per file, not O(files)
            look = self._to_look_at(sweep, dirty, named)
            busy, names = self.busy, self._names
            for key, f in look:
                norm, directory = names[key]
                watched = watches(directory)
                if not sweep and norm not in dirty and _settled(f, watched):
                    if not f.assembler.held:
                        busy.discard(key)  # its held bytes were flushed by their timeout
                    continue  # busy for its held bytes only: read to its end, no write since
                try:
                    changed = f.refresh(mono)
                    # Check the content before reading bytes that may belong to a new file.
                    if f.truncated(check_fp or changed):
                        if fileset.truncated(f, mono):
                            progress = True  # the rotated copy's rest is read in the next pass
                        held = self.held()
                except OSError as exc:
                    counters.errors += 1
                    log.error("%s: %s", f.path, exc)
                    busy.add(key)
                    continue
                budget = max_buffer_bytes - ledger.inflight - held - first_bytes
                if budget <= 0:
                    self.sweep = True  # files not looked at yet may have had write events
                    self.paused_memory = True
                    if first:
                        send_first()
                    return
                if not f.at_eof:
                    split_before = f.assembler.lines_split
                    held_before = f.assembler.held
                    try:
                        chunks, nbytes, nlines = f.read(budget, wall, mono)
                    except OSError as exc:
                        counters.errors += 1
                        log.error("%s: read failed: %s", f.path, exc)
                        busy.add(key)
                        continue
                    counters.lines_split += f.assembler.lines_split - split_before
                    held += f.assembler.held - held_before
                    if nbytes:
                        progress = True
                        counters.bytes_read += nbytes
                        counters.lines_read += nlines
                        if id(f) in holding or _first_bytes_unsaved(f):
                            holding.add(id(f))
                            first.append((f, chunks))
                            first_bytes += nbytes
                        else:
                            send(f, f.stream, chunks)
                if _settled(f, watched) and not f.assembler.held:
                    busy.discard(key)  # done until inotify names it again (or a sweep)
                else:
                    busy.add(key)
                if ledger.send_backoff_until > mono:
                    # A send was refused (or the producer renewed) in this pass: reading waits
                    # for the backoff. Going on re-read the refused record at once, in a tight
                    # loop that also kept the backoff, and so a fatal producer's renewal, away.
                    self.sweep = True
                    if first:
                        send_first()
                    return
            if first:  # once per round: the next rounds send at once
                send_first()
            if dirty - named:
                fileset.next_scan = 0.0
            dirty = named = set()
            check_fp = sweep = False
            wall, mono = time.time(), time.monotonic()

    def _written(self, path: str, dirty: set[str]) -> bool:
        """Tell whether inotify reported a write to `path` (or cannot, outside its directories)."""
        norm, directory = self.fileset.norm_dir(path)
        return norm in dirty or not self.watcher.watches(directory)

    def check_truncations(self, mono: float) -> None:
        """Size/fingerprint check of the files that changed, without reading them."""
        ledger = self.ledger
        if mono < ledger.send_backoff_until or not ledger.sender.connected:
            return
        fileset = self.fileset
        named_only = fileset.watched_all and not self.sweep  # neither changes in this loop
        if named_only and self._generation == fileset.generation:
            look = self._busy_and_named(self.dirty, set())  # busy: those in unwatched directories
        else:
            look = list(self.files.items())
        for _, f in look:
            if named_only and not self._written(f.path, self.dirty):
                continue
            try:
                if f.truncated(f.refresh(mono)):
                    fileset.truncated(f, mono)
            except OSError as exc:
                self.counters.errors += 1
                log.error("%s: %s", f.path, exc)

    def flush_timed_out(self, wall: float, mono: float) -> None:
        """Ship partial lines and multiline events whose timeout has passed.

        Not while the file holds bytes the agent has not read: then the line's end (or the
        event's next lines) is already written and reading merely stopped, at the memory cap
        (Kafka away) or at a read's size limit, mid-line. Cutting the line there would ship it
        in two pieces; it is read whole once reading goes on.
        """
        send = self.ledger.send
        for _, f in self.looking():
            if not f.assembler.held or not f.assembler.due(wall, mono):
                continue
            try:
                unread = os.fstat(f.fd).st_size > f.read_offset  # no refresh(): read_all's job
            except OSError:
                unread = False
            if not unread:
                if _first_bytes_unsaved(f):  # a file's first bytes as a partial line: see there
                    self.fileset.checkpoint()
                send(f, f.stream, f.assembler.poll(wall, mono))

    def flush_all(self) -> None:
        """Ship every partial line and open event as it is (shutdown)."""
        send = self.ledger.send
        for f in list(self.files.values()):
            send(f, f.stream, f.assembler.flush())

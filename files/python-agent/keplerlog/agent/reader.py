"""Reading: one pass over the followed files that changed, within the memory budget.

Filebeat calls this part the harvester (one per file there; one loop over all files here, as
the agent has a single reading thread). It owns what the agent reads and when: which files a
pass looks at (those inotify named, `dirty`, or all of them in a `sweep`), the truncation and
rewrite checks that must come before reading bytes that may belong to a new file, the memory
budget (`max_buffer_bytes` minus the ledger's bytes in flight and the assemblers' held bytes),
and the timed flushes of partial lines and multiline events. Everything read goes straight to
the ledger; a truncation is handed to the file set, which owns identities.

The pass is the agent's hot path (hundreds of thousands of lines a second): the per-file loop
keeps its lookups in locals and does nothing per file that the old single-class loop did not.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

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
        self.next_fp_check = 0.0
        self.last_read = 0.0
        self.paused_memory = False  # the last read pass stopped at the buffer budget

    def held(self) -> int:
        """Bytes read but held by the assemblers (partial lines, open multiline events)."""
        return sum(f.assembler.held for f in self.files.values())

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
        dirty, self.dirty, self.sweep = self.dirty, set(), False
        self.paused_memory = False
        named: set[str] = set()
        files, counters, send = self.files, self.counters, ledger.send
        norm_dir, watches = fileset.norm_dir, self.watcher.watches
        max_buffer_bytes = self.cfg.limits.max_buffer_bytes
        progress = True
        while progress and (draining or not self._stopping()):
            progress = False
            ledger.results()
            held = self.held()  # kept up to date below: O(1) per file, not O(files)
            for f in list(files.values()):
                norm, directory = norm_dir(f.path)
                if norm in dirty:
                    named.add(norm)
                elif (
                    not sweep and f.at_eof and not f.detached and f.rewrite_due is None and watches(directory)
                ):
                    continue  # read to its end and inotify reported no write since
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
                    continue
                budget = max_buffer_bytes - ledger.inflight - held
                if budget <= 0:
                    self.sweep = True  # files not looked at yet may have had write events
                    self.paused_memory = True
                    return
                if f.at_eof:
                    continue
                split_before = f.assembler.lines_split
                held_before = f.assembler.held
                try:
                    chunks, nbytes, nlines = f.read(budget, wall, mono)
                except OSError as exc:
                    counters.errors += 1
                    log.error("%s: read failed: %s", f.path, exc)
                    continue
                counters.lines_split += f.assembler.lines_split - split_before
                held += f.assembler.held - held_before
                if nbytes:
                    progress = True
                    self.last_read = mono
                    counters.bytes_read += nbytes
                    counters.lines_read += nlines
                    send(f, f.stream, chunks)
                if time.monotonic() >= ledger.send_backoff_until > mono:
                    self.sweep = True
                    return
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
        for f in list(self.files.values()):
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
        for f in list(self.files.values()):
            if not f.assembler.held or not f.assembler.due(wall, mono):
                continue
            try:
                unread = os.fstat(f.fd).st_size > f.read_offset  # no refresh(): read_all's job
            except OSError:
                unread = False
            if not unread:
                send(f, f.stream, f.assembler.poll(wall, mono))

    def flush_all(self) -> None:
        """Ship every partial line and open event as it is (shutdown)."""
        send = self.ledger.send
        for f in list(self.files.values()):
            send(f, f.stream, f.assembler.flush())

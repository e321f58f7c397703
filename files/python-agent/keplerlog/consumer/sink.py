"""One durable batch: plan, write-ahead intent, append + fsync, state, in that order.

Kept free of Kafka calls so the whole at-least-once/no-duplicate protocol can be tested without
a broker; app.py feeds it polled batches and commits what it returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from keplerlog.paths import UnsafePathError

from . import coverage, lines, marks, reports
from .diskwait import wait_out_full_disk
from .files import DISK_FULL_ERRNOS, DiskFullError, FileCache
from .journal import Journal, PartitionState, state_name
from .lines import Holds
from .marks import Mark
from .metrics import Metrics
from .route import Plan, RecordLike, Router

log = logging.getLogger(__name__)

# Seconds between two rebuilds of a partition's daily audit reports (see Sink.write_reports).
REPORT_INTERVAL_S = 10.0

TopicPartition = tuple[str, int]  # kafka.TopicPartition is a namedtuple of (topic, partition)
STATE_TTL_MS = 30 * 24 * 3600 * 1000
MAX_SOURCES = 100_000  # per partition: ~10 MB of state; hundreds of hosts x files x rotations fit
_PRUNE_EVERY_S = 600.0
_FINISH_RETRY_MAX_S = 10.0


class StateNotApplied(DiskFullError):
    """A batch is durable but the disk was full when its state files were written.

    Its lines are appended and fsynced and its intent is committed (a crash now rolls it
    forward, journal.py), so it must never be written again: the caller pauses and calls
    `Sink.apply_pending()` until it succeeds, then commits the offsets that returns. Before
    this error existed the writer thread retried in place, unseen: no pause gauge, no count,
    and a consumer that stopped polling for as long as the disk stayed full.
    """


@dataclass(slots=True)
class _Written:
    """What a durable batch changes in memory once its state files are written."""

    plan: Plan
    offsets: dict[TopicPartition, int]
    states: dict[str, PartitionState]
    holds: dict[TopicPartition, Holds]
    consumed: dict[TopicPartition, int]
    totals: dict[TopicPartition, dict[tuple[str, str], tuple[int, int, int]]]


class Sink:
    """Owns the in-memory state of the assigned partitions and writes batches durably."""

    def __init__(
        self,
        router: Router,
        files: FileCache,
        journal: Journal,
        metrics: Metrics,
        state_ttl_ms: int = STATE_TTL_MS,
        max_sources: int = MAX_SOURCES,
        max_marks: int = marks.MAX_MARKS,
        report_interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        self.router = router
        self.files = files
        self.journal = journal
        self.metrics = metrics
        self.state_ttl_ms = state_ttl_ms
        self.max_sources = max_sources
        self.max_marks = max_marks
        self.report_writer = reports.ReportWriter(journal.root, router.guard)
        # Days whose report is behind the committed marks, per partition, and when each
        # partition's reports were last written: rebuilt at most every report_interval_s.
        self.report_interval_s = report_interval_s
        self._reports_pending: dict[TopicPartition, set[str]] = {}
        self._reports_at: dict[TopicPartition, float] = {}
        # Per partition: missing bytes, incomplete files, lost bytes per (service, module).
        self.audit_totals: dict[TopicPartition, dict[tuple[str, str], tuple[int, int, int]]] = {}
        self.states: dict[TopicPartition, PartitionState] = {}
        # Incomplete line ends per partition (lines.py) and the next offset to read, in memory
        # only: after a restart they are rebuilt by reading from the state's next_offset.
        self.holds: dict[TopicPartition, Holds] = {}
        self.consumed: dict[TopicPartition, int] = {}
        self._pruned_at: dict[TopicPartition, float] = {}
        self.unapplied: _Written | None = None  # durable, its state not written yet (disk full)

    def assign(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Take the partitions' locks, recover dead peers' intents, load states.

        Returns where to resume each partition. Recovery comes after the locks: an old owner
        lets a partition go when it exits (or has nothing left to apply), and only then is
        its committed intent a dead one that recovery rolls forward before the state is read.
        """
        partitions = list(partitions)
        for tp in partitions:
            self.journal.locks.wait_partition(tp[0], tp[1])  # a stalled old owner lets go first
        self.recover_dead()
        resume: dict[TopicPartition, int] = {}
        for tp in partitions:
            topic, partition = tp[0], tp[1]
            state = self.journal.load(topic, partition)
            self.states[tp] = state
            self.holds.pop(tp, None)  # read again from next_offset: held lines come back
            if state.next_offset is not None:
                resume[tp] = state.next_offset
            self._rewrite_reports(tp, state.marks)
            self.audit_totals[tp] = marks.totals(state.marks.values())
        self.metrics.set_audit(self.audit_totals.values())
        return resume

    def _rewrite_reports(self, tp: TopicPartition, loaded: dict[str, Mark]) -> None:
        """Write the reports of a loaded state: a previous owner may have left them behind it."""
        if not loaded:
            return
        try:
            self.report_writer.write(
                reports.build(tp[0], tp[1], day, loaded.values()) for day in reports.days(loaded.values())
            )
        except (OSError, ValueError) as exc:
            self.metrics.inc("audit_report_failures")
            log.error("audit reports of %s-%d not rewritten: %s", tp[0], tp[1], exc)

    def has_expired_holds(self) -> bool:
        """Tell whether a held line end is due to be written although no record came."""
        return any(lines.expired(holds, self.router.lines) for holds in self.holds.values())

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget partitions given up (everything written is already durable).

        A partition whose written batch still waits for its state (only when stopping on a
        full disk) keeps its lock until the process exits: its next owner then recovers the
        committed intent before it reads the state.
        """
        partitions = list(partitions)
        waiting = set(self.unapplied.offsets) if self.unapplied is not None else set()
        self.write_reports(force=True, only=partitions)  # the next owner continues them
        for tp in partitions:
            self._reports_pending.pop(tp, None)
            self._reports_at.pop(tp, None)
            self.states.pop(tp, None)
            self.holds.pop(tp, None)
            self.consumed.pop(tp, None)
            self.audit_totals.pop(tp, None)
            if tp not in waiting:
                self.journal.locks.release_partition(tp[0], tp[1])
        self.metrics.set_audit(self.audit_totals.values())

    def write(self, batch: Mapping[TopicPartition, Sequence[RecordLike]]) -> dict[TopicPartition, int]:
        """Make a polled batch durable; returns the next offset per partition to commit.

        Raises DiskFullError after rolling back (files truncated, state untouched): the same
        batch can be passed again later. Any other OSError also rolls back and propagates.
        A path that became a symlink after the router's check (open_beneath() refused it,
        before anything was written) is checked afresh: the batch is planned again and its
        records go to quarantine.
        """
        try:
            earlier = self.apply_pending()  # {} unless a durable batch's state is still to write
        except StateNotApplied as exc:  # this batch was not touched: an ordinary full disk for it
            raise DiskFullError(exc.errno, exc.strerror) from exc
        try:
            offsets = self._write(batch)
        except UnsafePathError as exc:
            log.error("%s: planning the batch again with fresh path checks", exc)
            self.router.guard.forget()
            offsets = self._write(batch)
        return {**earlier, **offsets}

    def apply_pending(self) -> dict[TopicPartition, int]:
        """Write the state of the durable batch a full disk held back; returns its offsets.

        Raises StateNotApplied while the disk is still full. {} when nothing is pending.
        """
        done = self.unapplied
        if done is None:
            return {}
        self._finish(done.states)
        self.unapplied = None
        return self._apply(done)

    def _write(self, batch: Mapping[TopicPartition, Sequence[RecordLike]]) -> dict[TopicPartition, int]:
        now_ms = int(time.time() * 1000)
        plan = Plan()
        new_states: dict[str, PartitionState] = {}
        new_holds: dict[TopicPartition, Holds] = {}
        new_consumed: dict[TopicPartition, int] = {}
        new_totals: dict[TopicPartition, dict[tuple[str, str], tuple[int, int, int]]] = {}
        offsets: dict[TopicPartition, int] = {}
        policy = self.router.lines
        for tp in [*batch, *(tp for tp in self.holds if tp not in batch)]:
            records = batch.get(tp) or ()
            if records and not self.journal.locks.try_partition(tp[0], tp[1]):
                # Another consumer owns it now (we lost it while stalled): not ours to write.
                plan.counts["unowned_records"] += len(records)
                log.warning(
                    "partition %s-%d is locked by its new owner: %d records not written",
                    tp[0],
                    tp[1],
                    len(records),
                )
                self.states.pop(tp, None)
                continue
            holds = self.holds.get(tp, {})
            if not records and not lines.expired(holds, policy):
                continue
            state = self.states.setdefault(tp, PartitionState())
            files = dict(state.files)
            holds = dict(holds)
            tp_marks = dict(state.marks)
            for rec in records:
                self.router.route(rec, files, plan, now_ms, holds, tp_marks)
            for key in lines.expired(holds, policy):
                self.router.flush(key, holds, files, plan, now_ms, cut=False, marks=tp_marks)
            self._maybe_prune(tp, files, tp_marks, now_ms)
            if len(files) > self.max_sources:
                self._evict(files, plan)
            if len(tp_marks) > self.max_marks:
                plan.counts["audit_marks_evicted"] += marks.evict(tp_marks, self.max_marks)
            if tp_marks == state.marks:  # values compared by identity first: cheap when unchanged
                tp_marks = state.marks
            else:
                new_totals[tp] = marks.totals(tp_marks.values())
            consumed = records[-1].offset + 1 if records else self.consumed[tp]
            pinned = lines.pin(holds)  # a held line's first record must be read again after a crash
            offsets[tp] = consumed if pinned is None else min(pinned, consumed)
            new_states[state_name(tp[0], tp[1])] = PartitionState(offsets[tp], files, tp_marks)
            new_holds[tp] = holds
            new_consumed[tp] = consumed
        if not offsets:
            self.metrics.add(plan.counts, plan.quarantine_reasons)  # e.g. unowned_records
            self.write_reports()
            return {}
        done = _Written(plan, offsets, new_states, new_holds, new_consumed, new_totals)
        if plan.chunks:
            try:
                self._append(plan, new_states)
            except StateNotApplied:
                self.unapplied = done
                raise
        else:  # only duplicates, empties, watermarks or drops: the state still moves on
            try:
                self.journal.save_states(new_states)
            except OSError as exc:
                raise _as_disk_full(exc) from exc
        return self._apply(done)

    def _apply(self, done: _Written) -> dict[TopicPartition, int]:
        """Take a batch whose state files are written into memory: states, holds, reports, metrics."""
        plan, offsets = done.plan, done.offsets
        for tp in offsets:
            self.states[tp] = done.states[state_name(tp[0], tp[1])]
            self.holds[tp] = done.holds[tp]
            self.consumed[tp] = done.consumed[tp]
        for topic, partition, day in plan.audit_days:
            if (topic, partition) in offsets:
                self._reports_pending.setdefault((topic, partition), set()).add(day)
        if done.totals:
            self.audit_totals.update(done.totals)
            self.metrics.set_audit(self.audit_totals.values())
        self.metrics.gauges["held_bytes"] = sum(
            len(h.data) for hs in self.holds.values() for h in hs.values()
        )
        done_ms = int(time.time() * 1000)
        self.metrics.observe_latency(done_ms, plan.read_ts_ms)
        self.metrics.batch_records.observe(plan.counts["records"])
        plan.counts["batches"] += 1
        self.metrics.add(plan.counts, plan.quarantine_reasons, self.router.written(plan))
        self.metrics.gauges["open_files"] = len(self.files)
        self.write_reports()
        return offsets

    def reports_due(self) -> bool:
        """Tell whether a partition's reports are behind its marks and their interval is up."""
        now = time.monotonic()
        return any(
            days and now - self._reports_at.get(tp, -math.inf) >= self.report_interval_s
            for tp, days in self._reports_pending.items()
        )

    def write_reports(self, force: bool = False, only: Iterable[TopicPartition] | None = None) -> None:
        """Write the reports that are behind the committed marks (at most every interval).

        A batch of watermarks changes a day's report, and rebuilding it costs time in the number
        of the partition's files: 20,000 files in every batch would be half a second each. So
        reports follow the committed state at most every report_interval_s (and when a
        partition is given up, and at shutdown with `force`). After a crash they are rebuilt
        from the state when the partition is assigned: a report never gets ahead of the marks.
        A failure (a full disk, a permission) is logged, counted and retried next time; it
        never holds the logs back.
        """
        now = time.monotonic()
        for tp in list(only if only is not None else self._reports_pending):
            days = self._reports_pending.get(tp)
            state = self.states.get(tp)
            if not days or state is None:
                continue
            if not force and now - self._reports_at.get(tp, -math.inf) < self.report_interval_s:
                continue
            try:
                self.report_writer.write(
                    reports.build(tp[0], tp[1], day, state.marks.values()) for day in sorted(days)
                )
            except (OSError, ValueError) as exc:  # ValueError: a topic name that is no file name
                self.metrics.inc("audit_report_failures")
                log.error("audit reports of %s-%d not written (retried): %s", tp[0], tp[1], exc)
                continue
            self._reports_pending.pop(tp, None)
            self._reports_at[tp] = now

    def _append(self, plan: Plan, new_states: dict[str, PartitionState]) -> None:
        data = plan.chunks  # each file's chunks, in order: FileCache.append writes them unjoined
        self._lock_files(list(data))
        locked = True
        sizes: dict[str, tuple[int, int]] = {}
        try:
            try:
                for rel, chunks in data.items():
                    sizes[rel] = (self.files.size(rel), sum(map(len, chunks)))
                self.journal.begin(sizes)
            except OSError as exc:
                self._clear_quietly()
                raise _as_disk_full(exc) from exc
            try:
                for rel, chunks in data.items():
                    self.files.append(rel, chunks)
                t0 = time.monotonic()
                self.files.sync()
                self.metrics.fsync.observe(time.monotonic() - t0)
                self.journal.commit(sizes, new_states)
            except OSError as exc:
                locked = False  # if the rollback fails, the locks stay until the process exits
                self._rollback(sizes)
                locked = True
                raise _as_disk_full(exc) from exc
        finally:
            if locked:
                self.journal.locks.unlock_files()
        self._finish(new_states)

    def _finish(self, states: dict[str, PartitionState]) -> None:
        """Write a committed batch's state files and drop its intent.

        Past the commit the batch is durable: finishing must succeed. A full disk raises
        StateNotApplied (the caller pauses and retries, seen in the disk-full metrics); any other
        error is retried here with a doubling pause, as it may be transient (EIO, a stale NFS
        handle) and giving up would only make recovery do the same at the next start.
        """
        delay = 0.1
        while True:
            try:
                self.journal.finish(states)
                return
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise StateNotApplied(exc.errno, exc.strerror) from exc
                log.error("cannot apply committed state (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, _FINISH_RETRY_MAX_S)

    def recover_dead(self) -> None:
        """Roll dead consumers' intents forward or back (journal.py), waiting out a full disk.

        Rolling forward writes state files, so a full disk refuses it at start and in assign;
        this waits there (counted, paused gauge 1) rather than raising into a restart loop.
        """
        recovered = wait_out_full_disk(
            self.journal.recover, self.metrics, "recovering a dead consumer's batch", _FINISH_RETRY_MAX_S
        )
        if recovered:
            self.metrics.inc("recovered_intents", len(recovered))

    def _lock_files(self, rels: list[str]) -> None:
        """Take the batch's file locks; first undo torn appends of dead peers to these files."""
        while True:
            self.journal.locks.lock_files(rels)
            if not self.journal.dead_write_intent_for(rels):
                return
            self.journal.locks.unlock_files()
            recovered = self.journal.recover()
            if recovered:
                self.metrics.inc("recovered_intents", len(recovered))
            else:  # its owner is still finishing (or just died): look again shortly
                time.sleep(0.1)

    def _rollback(self, sizes: dict[str, tuple[int, int]]) -> None:
        """Undo an append that did not complete; keep the intent if even that fails."""
        try:
            for rel, (before, _) in sizes.items():
                self.files.truncate(rel, before)
        except OSError as exc:
            log.error("rollback failed (%s): the intent stays and is applied on restart", exc)
            raise
        self._clear_quietly()

    def _clear_quietly(self) -> None:
        try:
            self.journal.clear()
        except OSError as exc:
            log.error("cannot remove intent: %s", exc)

    def _maybe_prune(
        self, tp: TopicPartition, files: dict[str, coverage.Entry], tp_marks: dict[str, Mark], now_ms: int
    ) -> None:
        """Forget source files and audit marks not seen for their TTL (checked rarely).

        A watermark refreshes its file's coverage entry, so a followed file keeps its ranges.
        """
        now = time.monotonic()
        if now - self._pruned_at.get(tp, 0.0) < _PRUNE_EVERY_S:
            return
        self._pruned_at[tp] = now
        limit = now_ms - self.state_ttl_ms
        for key in [k for k, entry in files.items() if coverage.seen_ms(entry) < limit]:
            del files[key]
        marks.expire(tp_marks, now_ms - min(self.state_ttl_ms, marks.MARK_TTL_MS))

    def _evict(self, files: dict[str, coverage.Entry], plan: Plan) -> None:
        """Past `max_sources`, forget the least recently seen tenth (a replay of them repeats)."""
        keep = self.max_sources * 9 // 10
        by_age = sorted(files, key=lambda k: coverage.seen_ms(files[k]))
        for key in by_age[: len(files) - keep]:
            del files[key]
        plan.counts["sources_evicted"] += len(by_age) - keep
        log.warning(
            "more than %d source files in one partition: forgot the %d oldest",
            self.max_sources,
            len(by_age) - keep,
        )


def _as_disk_full(exc: OSError) -> OSError:
    if isinstance(exc, DiskFullError):
        return exc
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(exc.errno, exc.strerror)
    return exc

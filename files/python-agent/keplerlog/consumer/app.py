"""The Kafka side: group membership, poll loop, rebalance hooks, disk-full backoff, shutdown.

Offsets are committed only after Sink.write() returned, i.e. after data and state are fsynced.
On assignment each partition resumes from its state file (which is never behind the group
commit), so a commit lost in a crash causes no replay at all.

Pipelining: one batch at a time is made durable by Sink.write() on a writer thread while the
main thread polls (fetches, decompresses, parses) the next one, so disk and Kafka overlap. At
most two batches exist: the one being written and the one being gathered. The writer is the
only user of the Sink and the FileCache while it runs; the main thread touches them (commit,
idle close, rebalance) only after waiting for it. Order per batch is unchanged: intent ->
write + fsync -> state -> (main thread) Kafka commit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from keplerlog import gctune
from keplerlog.kafkaauth import watch_connection_problems
from keplerlog.metrics_http import stop as stop_server
from keplerlog.paths import PathGuard

from . import headerfix, netfix
from .config import ConsumerConfig
from .diskwait import wait_out_full_disk
from .files import DiskFullError, FileCache, FileOps
from .journal import Journal
from .metrics import Metrics, PeriodicLog, start_server
from .route import Router, TsWindow
from .sink import Sink, StateNotApplied

log = logging.getLogger(__name__)

CONNECT_BACKOFF_S = (5.0, 60.0)  # first and longest wait between two attempts to reach Kafka

MAX_BACKOFF_S = 30.0
REBALANCE_BACKOFF_S = 10.0  # the longest wait inside a rebalance callback (no poll possible)


def new_consumer_id() -> str:
    """Return a unique id for this process (names its intent and liveness lock in the state dir)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Listener(ConsumerRebalanceListener):
    def __init__(self, app: ConsumerApp) -> None:
        self.app = app

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.app.on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.app.on_assigned(list(assigned))


class ConsumerApp:
    """Runs the consumer until stop() is called (SIGTERM) or the process dies."""

    def __init__(
        self, config: ConsumerConfig, ops: FileOps | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config
        self.metrics = Metrics(config.root, config.group_id)
        # Exported from the start, so alerts and panels on them have a series before the first
        # disk-full, held line or commit; the last commit time starts at the start time (a
        # consumer that never commits ages from there, instead of having no series to alert on).
        self.metrics.gauges.update(
            open_files_limit=config.max_open_files,
            open_files=0,
            held_bytes=0,
            disk_full_paused=0,
            last_commit_timestamp_seconds=time.time(),
        )
        self._committed: dict[TopicPartition, int] = {}  # next offset per partition, as committed
        self._to_commit: dict[TopicPartition, int] = {}  # durable, not sent to Kafka yet
        self._commit_future: Any = None  # the asynchronous commit in flight (kafka.future.Future)
        self._in_flight: dict[TopicPartition, int] = {}  # its offsets
        os.makedirs(config.root, exist_ok=True)
        self.files = FileCache(config.root, config.max_open_files, config.idle_close_s, ops)
        self.journal = Journal(config.root, new_consumer_id())
        window = TsWindow(int(config.ts_max_age_days * 86_400_000), int(config.ts_max_ahead_s * 1000))
        router = Router(
            config.layout, config.zone, PathGuard(config.root), config.legacy_service, window, config.lines
        )
        self.sink = Sink(
            router,
            self.files,
            self.journal,
            self.metrics,
            int(config.state_ttl_days * 86400 * 1000),
            config.max_sources_per_partition,
        )
        self.periodic = PeriodicLog(self.metrics, config.log_interval_s)
        self._stop = threading.Event()
        self._sleep = sleep
        self._pending: dict[TopicPartition, list] = {}
        # The batch Sink.write() is making durable on the writer thread, and its future.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._inflight: tuple[Future[dict], dict[TopicPartition, list]] | None = None
        self.consumer: KafkaConsumer | None = None
        if config.client == "kafka-python":
            # The fetch path (kafka-python's I/O thread) was the bottleneck: 1 MiB socket reads
            # and a shorter GIL switch interval so that thread is not starved by parsing
            # (netfix.py). librdkafka fetches on its own threads, in C (rdclient.py).
            netfix.apply()
            netfix.favor_io_thread()
        headerfix.apply()  # a non-UTF-8 header key must not be a poison pill (headerfix.py)
        self._replaced_seen = headerfix.replaced_records()

    def stop(self) -> None:
        """Ask the loop to finish the current batch, commit and return."""
        self._stop.set()

    # -- rebalance (runs inside poll(), on kafka-python's IO thread, main thread blocked) -----
    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Give partitions up: everything written is durable; undurable records are dropped.

        A batch still being gathered or stalled by a full disk is written now; if that fails its
        records are dropped uncommitted, and the next owner reads them again.
        """
        self._settle_in_rebalance(revoked)
        pending = {tp: recs for tp, recs in self._pending.items() if tp in set(revoked)}
        if pending:
            try:
                offsets = self.sink.write(pending)
                self._commit(offsets, sync=False)
            except StateNotApplied:  # written: its state goes with the partitions
                self._apply_before_rebalance()
            except OSError as exc:
                log.warning("dropping %d unwritten partitions on revoke (%s)", len(pending), exc)
            for tp in pending:
                self._pending.pop(tp, None)
        self.sink.revoke(revoked)
        for tp in revoked:
            self._committed.pop(tp, None)
            self._to_commit.pop(tp, None)
        log.info("revoked %s", sorted(tp.partition for tp in revoked))

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Take partitions: recover dead peers' intents, resume where the state says."""
        self._settle_in_rebalance([])  # the Sink's states must not change under a running write
        resume = self.sink.assign([(tp.topic, tp.partition) for tp in assigned])
        assert self.consumer is not None
        for tp in assigned:
            offset = resume.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
                self._committed[tp] = offset  # durable up to here: the lag counts from it
        log.info(
            "assigned %s (resume from state: %s)",
            sorted(tp.partition for tp in assigned),
            {tp[1]: off for tp, off in resume.items()},
        )

    # -- main loop ---------------------------------------------------------------------------
    def _make_consumer(self) -> KafkaConsumer:
        c = self.config
        if c.client == "librdkafka":
            from .rdclient import RdConsumer

            return RdConsumer(c)  # type: ignore[return-value]  # the same calls (rdclient.py)
        return KafkaConsumer(
            bootstrap_servers=c.bootstrap_servers.split(","),
            group_id=c.group_id,
            group_instance_id=c.group_instance_id,
            client_id=c.client_id,
            enable_auto_commit=False,
            auto_offset_reset=c.auto_offset_reset,
            max_poll_records=c.max_poll_records,
            fetch_max_bytes=c.fetch_max_bytes,
            max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            receive_buffer_bytes=4 * 1024 * 1024,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=max(500, c.session_timeout_ms // 4),
            **c.security.client_kwargs(),
        )

    def _connect(self) -> KafkaConsumer | None:
        """Make the Kafka consumer, retrying until it connects or the app is stopped (then None).

        A wrong password or CA is not fixed by restarting the process: instead of exiting into a
        systemd restart loop, wait (5 s, doubling to 60 s: no hammering of the brokers) and say
        why in words, since kafka-python itself only raises "Unable to bootstrap".
        """
        problems = watch_connection_problems()
        wait = CONNECT_BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                return self._make_consumer()
            except KafkaError as exc:
                log.warning(
                    "Kafka at %s: %s; next try in %.0f s",
                    self.config.bootstrap_servers,
                    getattr(exc, "explained", None) or problems.explain(exc),
                    wait,
                )
                self.metrics.inc("connect_failures")
            self._stop.wait(wait)
            wait = min(CONNECT_BACKOFF_S[1], 2 * wait)
        return None

    def run(self, consumer: KafkaConsumer | None = None) -> None:
        """Consume until stopped; returns after a clean shutdown."""
        server = (
            start_server(self.metrics, self.config.metrics_host, self.config.metrics_port)
            if self.config.metrics_port > 0
            else None
        )
        self.sink.recover_dead()  # after the server: a wait for disk space shows
        self.consumer = consumer or self._connect()
        if self.consumer is None:  # stopped before Kafka answered: nothing was read
            self._writer.shutdown(wait=True)
            self.files.close_all()
            self.journal.close()
            stop_server(server)
            return
        self.consumer.subscribe([self.config.topic], listener=_Listener(self))
        gctune.settle()  # started: the rest is per batch (keplerlog/gctune.py)
        try:
            while not self._stop.is_set():
                batch = self._gather()  # the writer works on the previous batch meanwhile
                failed, error = self._settle()  # from here the writer is idle
                self._send_commits()  # what waited for the previous commit's answer
                if self.files.close_idle():
                    self.metrics.gauges["open_files"] = len(self.files)
                self._count_replaced_keys()
                self._update_lag()
                self.periodic.tick()
                if error is not None:
                    # Retry the failed batch (and what came after it, in order) in the
                    # foreground with the disk-full backoff; nothing of it is committed yet.
                    # Unless it is durable and only its state is left (StateNotApplied).
                    durable = isinstance(error, StateNotApplied)
                    self._process(batch if durable else _merge(failed, batch), error)
                elif batch or self.sink.has_expired_holds() or self.sink.reports_due():
                    self._submit(batch)  # an empty batch writes held line ends, reports that are due
        finally:
            error: DiskFullError | None = None
            try:
                error = self._settle()[1]
                if self.sink.unapplied is not None:  # one more try: its partitions wait for it
                    self._commit(self.sink.apply_pending())
            except DiskFullError:
                pass  # the state still waits: said below
            except Exception:  # still release Kafka and the files below
                log.exception("writer failed at shutdown")
            if self.sink.unapplied is not None:
                log.warning(
                    "last batch written, its state not saved (disk full): its partitions stay locked "
                    "until this process exits, then their next owner applies it"
                )
            elif error is not None and not isinstance(error, StateNotApplied):
                log.warning("last batch not written (disk full): not committed, read again later")
            self._writer.shutdown(wait=True)
            self.sink.write_reports(force=True)  # the audit reports of the last batches
            self._send_commits(sync=True)
            log.info("stopping: %s", self.metrics.summary())
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as exc:
                log.warning("consumer close: %s", exc)
            self.files.close_all()
            self.journal.close()
            stop_server(server)

    def _gather(self) -> dict[TopicPartition, list]:
        """Poll until `batch_max_bytes` or `batch_max_wait_ms`: fewer, larger durable batches.

        Or until caught up while the writer is idle (group commit: records that come while the
        writer fsyncs form the next batch, so the batch size follows the load and a quiet topic
        costs no wait). Caught up: the last poll brought every partition's records up to its
        high watermark (what the broker had), or a poll of `batch_idle_ms` brought nothing.
        The idle poll alone would keep a steady stream of small records (many agents, or one that
        reads often) gathering for the whole `batch_max_wait_ms` (measured: +30 ms end to end
        with records every 5-20 ms), since each idle poll brings another one.
        The growing batch is visible as pending, so a rebalance during the extra polls writes
        the records of revoked partitions before giving them up (see on_revoked).
        """
        assert self.consumer is not None
        first = self.consumer.poll(timeout_ms=500)
        if not first:
            return {}
        batch = {tp: list(recs) for tp, recs in first.items()}
        size = sum(len(r.value or b"") for recs in batch.values() for r in recs)
        deadline = time.monotonic() + self.config.batch_max_wait_ms / 1000
        idle_ms = self.config.batch_idle_ms
        caught_up = self._at_highwater(first)
        self._pending = batch
        try:
            while size < self.config.batch_max_bytes and not self._stop.is_set():
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    break
                if idle_ms and caught_up and self._writer_idle():
                    break
                more = self.consumer.poll(timeout_ms=min(left_ms, idle_ms) if idle_ms else left_ms)
                if not more and idle_ms and self._writer_idle():
                    break
                caught_up = caught_up if not more else self._at_highwater(more)
                for tp, recs in more.items():
                    batch.setdefault(tp, []).extend(recs)
                    size += sum(len(r.value or b"") for r in recs)
        finally:
            batch = self._pending  # minus partitions that a rebalance took away
            self._pending = {}
        return batch

    def _at_highwater(self, polled: dict[TopicPartition, list]) -> bool:
        """Tell whether a poll brought each of its partitions up to the broker's high watermark.

        The high watermark is the one of the fetch that brought the records (kept locally, no
        request): the partition holds nothing more that the consumer may read yet.
        """
        assert self.consumer is not None
        try:
            for tp, recs in polled.items():
                high = self.consumer.highwater(tp)
                if not recs or high is None or recs[-1].offset + 1 < high:
                    return False
        except KafkaError:  # IllegalStateError: revoked meanwhile
            return False
        return True

    def _writer_idle(self) -> bool:
        """Tell whether the writer thread has finished the previous batch (or has none)."""
        return self._inflight is None or self._inflight[0].done()

    def _count_replaced_keys(self) -> None:
        replaced = headerfix.replaced_records() + getattr(self.consumer, "unreadable_headers", 0)
        if replaced != self._replaced_seen:
            self.metrics.inc("replaced_header_keys", replaced - self._replaced_seen)
            log.warning(
                "%d records had header keys that are not UTF-8 (%s)",
                replaced - self._replaced_seen,
                "read with U+FFFD"
                if self.config.client == "kafka-python"
                else "read without headers, as legacy lines: librdkafka cannot decode them",
            )
            self._replaced_seen = replaced

    def _submit(self, batch: dict[TopicPartition, list]) -> None:
        """Hand a batch to the writer thread (the previous one must be settled)."""
        assert self._inflight is None
        self._inflight = (self._writer.submit(self.sink.write, batch), batch)

    def _settle(self) -> tuple[dict[TopicPartition, list], DiskFullError | None]:
        """Wait for the writer; commit what it made durable; return a batch the disk refused.

        A batch that hit a full disk was rolled back by the Sink (files truncated, state
        untouched); it comes back with the error, to be written again. Any other error
        propagates, as it did when the main thread wrote (the process exits, nothing committed).
        """
        if self._inflight is None:
            return {}, None
        future, batch = self._inflight
        self._inflight = None
        try:
            offsets = future.result()
        except DiskFullError as exc:
            return batch, exc
        self._commit(offsets)
        return {}, None

    def _settle_in_rebalance(self, revoked: list[TopicPartition]) -> None:
        """Finish the writer's batch before partitions move (runs inside poll()).

        Written: committed (asynchronously, as the rest of on_revoked). Failed: its records and
        everything polled after them are dropped uncommitted for their partitions; a partition
        we keep seeks back to the first failed offset so nothing is skipped, a revoked one is
        read again by its next owner from the state file (which the failed write did not move).
        """
        if self._inflight is None:
            self._apply_before_rebalance()  # a foreground retry's poll() may have brought us here
            return
        future, batch = self._inflight
        self._inflight = None
        try:
            offsets = future.result()
        except StateNotApplied:  # durable: never read again; its state must be written first
            self._apply_before_rebalance()
            return
        except OSError as exc:
            log.warning("batch failed during rebalance (%s): re-reading it", exc)
            assert self.consumer is not None
            kept = set(self.consumer.assignment()) - set(revoked)
            for tp, recs in batch.items():
                self._pending.pop(tp, None)  # in place: _gather() keeps extending this dict
                if tp in kept and recs:
                    self.consumer.seek(tp, recs[0].offset)
            return
        self._commit(offsets, sync=False)

    def _apply_before_rebalance(self) -> None:
        """Write the state of a durable batch before partitions move, waiting out a full disk.

        The next owner resumes from the state files: moving on without them would make it read
        (and append) the batch again. So this blocks, as the rebalance callback must, unless
        the consumer is stopping: then Sink.revoke keeps those partitions locked until the
        process exits, and their next owner rolls the committed intent forward first.
        """
        if self.sink.unapplied is None:
            return
        offsets = wait_out_full_disk(
            self.sink.apply_pending,
            self.metrics,
            "in a rebalance: state not written",
            REBALANCE_BACKOFF_S,  # a SIGTERM waits at most this
            sleep=self._sleep,
            stopping=self._stop.is_set,
        )
        if offsets is not None:
            self._commit(offsets, sync=False)

    def _process(self, batch: dict[TopicPartition, list], failed: DiskFullError | None = None) -> None:
        """Write one batch, pausing consumption and backing off while the disk is full.

        `failed`: the writer thread's attempt at (the start of) this batch already hit a full
        disk; it counts as the first attempt, so the backoff starts before the next one.
        A StateNotApplied (the writer's batch is durable, its state is not) is retried with
        `Sink.apply_pending()` first, then `batch` is written.
        """
        assert self.consumer is not None
        delay = 1.0
        self._pending = batch
        try:
            if failed is not None:
                if not self._back_off(failed, delay):
                    return
                delay = min(delay * 2, MAX_BACKOFF_S)
            while self._pending or self.sink.unapplied is not None:
                writing = self.sink.unapplied is None  # else its state first, then _pending
                try:
                    offsets = self.sink.write(self._pending) if writing else self.sink.apply_pending()
                except DiskFullError as exc:
                    if writing and isinstance(exc, StateNotApplied):
                        self._pending = {}  # durable now: what the back-off polls is the next batch
                    if not self._back_off(exc, delay):
                        return
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                if writing:
                    self._pending = {}
                self.metrics.gauges["disk_full_paused"] = 0
                self._commit(offsets)
            # done (a rebalance during the back-off may have taken what was pending)
            self.metrics.gauges["disk_full_paused"] = 0
        finally:
            self._pending = {}
            if self.consumer.paused():
                self.consumer.resume(*self.consumer.paused())

    def _back_off(self, exc: DiskFullError, delay: float) -> bool:
        """Count and log a full disk, pause, wait, poll; False when stopping instead."""
        assert self.consumer is not None
        self.metrics.inc("disk_full")
        self.metrics.gauges["disk_full_paused"] = 1  # 0 again once a batch is durable
        self._update_lag()
        what = (
            "written, its state not saved"
            if isinstance(exc, StateNotApplied)
            else "rolled back, not committed"
        )
        log.error("disk full (%s): batch %s; retry in %.0fs", exc.strerror, what, delay)
        if self._stop.is_set():
            return False
        self.consumer.pause(*self.consumer.assignment())
        self._sleep(delay)
        more = self.consumer.poll(timeout_ms=0)  # keeps group membership alive
        for tp, recs in (more or {}).items():
            self._pending.setdefault(tp, []).extend(recs)
        return True

    def _commit(self, offsets: dict, sync: bool = False) -> None:
        """Commit Kafka offsets of partitions we still own; failures are logged, not fatal.

        Asynchronous by default, at most one request in flight and the offsets of the batches
        that come meanwhile merged into the next one: the state files are authoritative (the
        consumer seeks to them on assignment), so a commit only moves the group's offsets and
        the lag metric. A synchronous commit here held every next batch back by a round trip
        to the group coordinator. `sync` (at shutdown) waits for it.
        """
        assert self.consumer is not None
        owned = self.consumer.assignment()
        for tp, off in offsets.items():
            key = TopicPartition(tp[0], tp[1])
            if key in owned:
                self._to_commit[key] = off
        self._send_commits(sync)

    def _send_commits(self, sync: bool = False) -> None:
        """Send the merged offsets unless a commit is in flight (called again every loop)."""
        assert self.consumer is not None
        busy = self._commit_future is not None and not self._commit_future.is_done
        if busy and sync:  # its answer would come in a poll that never runs: send it again
            self._to_commit = {**self._in_flight, **self._to_commit}
        if not self._to_commit or (busy and not sync):
            return
        owned = self.consumer.assignment()
        commit = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self._to_commit.items() if tp in owned}
        self._in_flight, self._to_commit = self._to_commit, {}
        if not commit:
            return
        try:
            if sync:
                self.consumer.commit(commit)
                self._committed_ok(commit)
            else:
                self._commit_future = self.consumer.commit_async(commit, callback=self._commit_done)
        except (KafkaError, RuntimeError) as exc:
            self._commit_failed(exc)

    def _commit_done(self, offsets: dict, response: object) -> None:
        """kafka-python's callback of an asynchronous commit (runs inside poll())."""
        if isinstance(response, BaseException):
            self._commit_failed(response)
        else:
            self._committed_ok(offsets)

    def _committed_ok(self, offsets: dict) -> None:
        """Note what the group now has; an older answer never moves a partition back.

        Answers may come out of order: kafka-python runs the callbacks at a later poll, and a
        commit sent during a coordinator lookup is not the one `_commit_future` tracks.
        """
        owned = self.consumer.assignment() if self.consumer is not None else set()
        for tp, meta in offsets.items():
            if tp in owned:
                self._committed[tp] = max(meta.offset, self._committed.get(tp, meta.offset))
        self.metrics.gauges["last_commit_timestamp_seconds"] = time.time()
        self._update_lag()

    def _commit_failed(self, exc: BaseException) -> None:
        self.metrics.inc("commit_failures")
        log.warning("offset commit failed (state file stays authoritative): %s", exc)

    def _update_lag(self) -> None:
        """Per partition we own: the broker's high watermark (as last fetched) - what we committed.

        Both numbers are already known locally (no request to the broker). Before the first
        commit of a partition its lag is not shown rather than guessed.
        """
        assert self.consumer is not None
        lag: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            done = self._committed.get(tp)
            if high is not None and done is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - done)
        self.metrics.set_lag(lag)


def _merge(first: dict[TopicPartition, list], then: dict[TopicPartition, list]) -> dict[TopicPartition, list]:
    """Concatenate two consecutive batches per partition, older records first."""
    merged = {tp: list(recs) for tp, recs in first.items()}
    for tp, recs in then.items():
        merged.setdefault(tp, []).extend(recs)
    return merged

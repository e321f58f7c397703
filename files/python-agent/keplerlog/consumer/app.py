"""The Kafka side: group membership, poll loop, rebalance hooks, disk-full backoff, shutdown.

Offsets are committed only after Sink.write() returned, i.e. after data and state are fsynced.
On assignment each partition resumes from its state file (which is never behind the group
commit), so a commit lost in a crash causes no replay at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from .config import ConsumerConfig
from .files import DiskFullError, FileCache, FileOps, PathGuard
from .journal import Journal
from .metrics import Metrics, PeriodicLog, serve
from .route import Router
from .sink import Sink

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


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

    def __init__(self, config: ConsumerConfig, ops: FileOps | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.metrics = Metrics()
        os.makedirs(config.root, exist_ok=True)
        self.files = FileCache(config.root, config.max_open_files, config.idle_close_s, ops)
        self.journal = Journal(config.root, new_consumer_id())
        router = Router(config.layout, config.zone, PathGuard(config.root), config.legacy_service)
        self.sink = Sink(router, self.files, self.journal, self.metrics,
                         int(config.state_ttl_days * 86400 * 1000))
        self.periodic = PeriodicLog(self.metrics, config.log_interval_s)
        self._stop = threading.Event()
        self._sleep = sleep
        self._pending: dict[TopicPartition, list] = {}
        self.consumer: KafkaConsumer | None = None

    def stop(self) -> None:
        """Ask the loop to finish the current batch, commit and return."""
        self._stop.set()

    # -- rebalance (runs inside poll(), on kafka-python's IO thread, main thread blocked) -----
    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Give partitions up: everything written is durable; undurable records are dropped.

        A batch still being gathered or stalled by a full disk is written now; if that fails its
        records are dropped uncommitted, and the next owner reads them again.
        """
        pending = {tp: recs for tp, recs in self._pending.items() if tp in set(revoked)}
        if pending:
            try:
                offsets = self.sink.write(pending)
                self._commit(offsets, sync=False)
            except OSError as exc:
                log.warning("dropping %d unwritten partitions on revoke (%s)", len(pending), exc)
            for tp in pending:
                self._pending.pop(tp, None)
        self.sink.revoke(revoked)
        log.info("revoked %s", sorted(tp.partition for tp in revoked))

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Take partitions: recover dead peers' intents, resume where the state says."""
        resume = self.sink.assign([(tp.topic, tp.partition) for tp in assigned])
        assert self.consumer is not None
        for tp in assigned:
            offset = resume.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
        log.info("assigned %s (resume from state: %s)", sorted(tp.partition for tp in assigned),
                 {tp[1]: off for tp, off in resume.items()})

    # -- main loop ---------------------------------------------------------------------------
    def _make_consumer(self) -> KafkaConsumer:
        c = self.config
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
            receive_buffer_bytes=4 * 1024 * 1024,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=max(500, c.session_timeout_ms // 4),
        )

    def run(self, consumer: KafkaConsumer | None = None) -> None:
        """Consume until stopped; returns after a clean shutdown."""
        recovered = self.journal.recover()
        if recovered:
            self.metrics.inc("recovered_intents", len(recovered))
        server = serve(self.metrics, self.config.metrics_host, self.config.metrics_port) \
            if self.config.metrics_port > 0 else None
        self.consumer = consumer or self._make_consumer()
        self.consumer.subscribe([self.config.topic], listener=_Listener(self))
        try:
            while not self._stop.is_set():
                batch = self._gather()
                if batch:
                    self._process(batch)
                if self.files.close_idle():
                    self.metrics.gauges["open_files"] = len(self.files)
                self.periodic.tick()
        finally:
            log.info("stopping: %s", self.metrics.summary())
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as exc:
                log.warning("consumer close: %s", exc)
            self.files.close_all()
            self.journal.close()
            if server is not None:
                server.shutdown()

    def _gather(self) -> dict[TopicPartition, list]:
        """Poll until `batch_max_bytes` or `batch_max_wait_ms`: fewer, larger durable batches.

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
        self._pending = batch
        try:
            while size < self.config.batch_max_bytes and not self._stop.is_set():
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    break
                more = self.consumer.poll(timeout_ms=left_ms)
                for tp, recs in more.items():
                    batch.setdefault(tp, []).extend(recs)
                    size += sum(len(r.value or b"") for r in recs)
        finally:
            batch = self._pending  # minus partitions that a rebalance took away
            self._pending = {}
        return batch

    def _process(self, batch: dict[TopicPartition, list]) -> None:
        """Write one batch, pausing consumption and backing off while the disk is full."""
        assert self.consumer is not None
        delay = 1.0
        self._pending = batch
        try:
            while self._pending:
                try:
                    offsets = self.sink.write(self._pending)
                except DiskFullError as exc:
                    self.metrics.inc("disk_full")
                    log.error("disk full (%s): batch rolled back, not committed; retry in %.0fs",
                              exc.strerror, delay)
                    if self._stop.is_set():
                        return
                    self.consumer.pause(*self.consumer.assignment())
                    self._sleep(delay)
                    more = self.consumer.poll(timeout_ms=0)  # keeps group membership alive
                    for tp, recs in (more or {}).items():
                        self._pending.setdefault(tp, []).extend(recs)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                self._pending = {}
                self._commit(offsets)
        finally:
            self._pending = {}
            if self.consumer.paused():
                self.consumer.resume(*self.consumer.paused())

    def _commit(self, offsets: dict, sync: bool = True) -> None:
        """Commit Kafka offsets of partitions we still own; failures are logged, not fatal."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        commit = {TopicPartition(tp[0], tp[1]): OffsetAndMetadata(off, "", -1)
                  for tp, off in offsets.items() if TopicPartition(tp[0], tp[1]) in owned}
        if not commit:
            return
        try:
            if sync:
                self.consumer.commit(commit)
            else:
                self.consumer.commit_async(commit)
        except (KafkaError, RuntimeError) as exc:
            self.metrics.inc("commit_failures")
            log.warning("offset commit failed (state file stays authoritative): %s", exc)

"""The consumer's Kafka client through librdkafka (confluent-kafka): `kafka.client: librdkafka`.

Why: `make bench` (bench_consumer.py's profile) found 40 % of the consumer's one core in
kafka-python's fetch and protocol code and 13 % in its LZ4 decompression, both on the Python
side of the GIL. librdkafka fetches and decompresses on its own threads, in C, while the main
thread routes and writes. Opt-in, like the agent's (agent/rdsender.py): confluent-kafka is a
compiled wheel (`pip install keplerlog[librdkafka]`).

`RdConsumer` offers the few calls of kafka-python's `KafkaConsumer` that `ConsumerApp` makes,
with the same types in and out (kafka-python's TopicPartition, records with `.topic`,
`.partition`, `.offset`, `.value`, `.headers`, `.timestamp`, `KafkaError` raised), so the app,
the Sink and the router cannot tell the clients apart. How the semantics are mapped:
- Rebalance callbacks run inside `poll()` on the main thread, as kafka-python's do (theirs run
  with the main thread blocked): the app's listener is called from librdkafka's
  on_assign/on_revoke/on_lost. A `seek()` made while partitions are being assigned is given to
  librdkafka as the start offset of `assign()` (a partition cannot be seeked before it is).
- Commit callbacks (the app keeps one asynchronous commit in flight) come from librdkafka's
  `on_commit`, served by `poll()` as kafka-python serves its own; they are matched to the
  requests in the order they were sent.
- `highwater()` is librdkafka's cached high watermark, updated by each fetch (no request), as
  kafka-python's is.
- A header key that is not UTF-8 cannot be read by confluent-kafka 2.16: `headers()` returns
  with a UnicodeDecodeError left pending, which surfaces as a SystemError at some later call.
  Headers are read through `operator.methodcaller`, whose call checks for that at once, and
  such a record is given with no headers (kafka-python's headerfix.py replaces the bad bytes
  instead, which needs the raw keys): its lines are written as a legacy record's, never lost,
  and counted in `unreadable_headers` (the app's replaced_header_keys).
- The fetched-but-unread queue (`queued.max.messages.kbytes`) holds PREFETCH_BATCHES of the
  app's batches (128 MiB at the defaults), and librdkafka looks again FETCH_QUEUE_BACKOFF_MS
  after finding it full, not after its default 1 s (`fetch.queue.backoff.ms`). The app takes a
  whole batch at a time while the writer has the one before: with librdkafka's defaults (a
  64 MiB queue, 1 s) the fetcher sat out a second each time the queue filled, and the main
  thread waited for records 61 % of the time (py-spy). Measured (2 GB, 64 MiB batches, 3
  alternating rounds, MB/s): one batch, 1 s: 321-362 (kcat -C 516-583); four batches, 1 s:
  542-613 in that run, 373-488 in the next (kcat 474-572), where four with 10 ms made 419-546,
  one with 10 ms 430-499 and two with 10 ms 446-496: two, 10 ms, at half the memory of four.
"""

from __future__ import annotations

import logging
import operator
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from keplerlog.rdkit import Problems, ask_cluster, bootstrap_list, explain

from .config import ConsumerConfig

log = logging.getLogger(__name__)

OFFSET_INVALID = -1001  # librdkafka: "no offset given", resume from the group's commit
PREFETCH_BATCHES = 2  # records fetched ahead, in the app's batches (see the module docstring)
FETCH_QUEUE_BACKOFF_MS = 10  # how soon librdkafka fetches again after finding its queue full
MAX_QUEUE_KB = 2_097_151  # librdkafka's largest queued.max.messages.kbytes
_headers = operator.methodcaller("headers")  # a checked call: see the module docstring


class RdRecord:
    """One consumed record, with kafka-python's attribute names (what route.py reads)."""

    __slots__ = ("headers", "offset", "partition", "timestamp", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        headers: list,
        timestamp: int | None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.value = value
        self.headers = headers
        self.timestamp = timestamp


class _Done:
    """The answer of an asynchronous commit, with kafka-python's Future's `is_done`."""

    __slots__ = ("is_done",)

    def __init__(self) -> None:
        self.is_done = False


def rdkafka_conf(c: ConsumerConfig, on_commit: Callable, on_error: Callable) -> dict[str, Any]:
    """Map the consumer's configuration onto librdkafka's names (the same values as kafka-python's)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap_list(c.bootstrap_servers),
        "group.id": c.group_id,
        "client.id": c.client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": c.auto_offset_reset,
        "fetch.max.bytes": c.fetch_max_bytes,
        "max.partition.fetch.bytes": c.max_partition_fetch_bytes,
        "fetch.wait.max.ms": c.fetch_max_wait_ms,
        "receive.message.max.bytes": c.fetch_max_bytes + 1024 * 1024,
        "socket.receive.buffer.bytes": 4 * 1024 * 1024,
        "session.timeout.ms": c.session_timeout_ms,
        "heartbeat.interval.ms": max(500, c.session_timeout_ms // 4),
        # eager, like kafka-python's default: a group may mix both clients while hosts move
        "partition.assignment.strategy": "range,roundrobin",
        "queued.max.messages.kbytes": min(
            MAX_QUEUE_KB, max(1024, PREFETCH_BATCHES * c.batch_max_bytes // 1024, c.fetch_max_bytes // 1024)
        ),
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        "on_commit": on_commit,
        "error_cb": on_error,
        **c.security.rdkafka_conf(),
    }
    if c.group_instance_id:
        conf["group.instance.id"] = c.group_instance_id
    return conf


class ConnectError(KafkaError):
    """The cluster did not answer; `explained` says why in the words of the agent's client."""

    def __init__(self, explained: str) -> None:
        super().__init__(explained)
        self.explained = explained


class RdConsumer:
    """The subset of kafka-python's KafkaConsumer that ConsumerApp uses, over librdkafka."""

    def __init__(self, config: ConsumerConfig, bootstrap_timeout_s: float = 5.0) -> None:
        """Make the consumer; ConnectError when the cluster does not answer in time.

        librdkafka itself never fails to be made, it retries in the background: asking for the
        cluster's metadata makes a wrong address, password or CA an error with a reason, as
        kafka-python's "Unable to bootstrap" is, for the app's connect loop.
        """
        from confluent_kafka.cimpl import Consumer, KafkaException

        self._exc = KafkaException
        self._problems = Problems(log, "Kafka")
        self._commits: deque[tuple[dict, Callable | None, _Done]] = deque()
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._seeks: dict[TopicPartition, int] | None = None  # collected while assigning
        self._listener: Any = None
        self._max_records = config.max_poll_records
        self.unreadable_headers = 0  # records whose header keys are not UTF-8
        self._c = Consumer(rdkafka_conf(config, self._on_commit, self._on_error))
        try:
            ask_cluster(self._c, bootstrap_timeout_s)
        except KafkaException as exc:
            self._c.close()
            raise ConnectError(explain(self._problems.reason or str(exc))) from exc

    # -- callbacks (all run inside poll()/consume() on the calling thread) ---------------------
    def _on_error(self, err: Any) -> None:
        """error_cb: keep the reason; warn without repeating it at every retry (rdkit.Problems)."""
        self._problems.note(err.str())

    def _on_commit(self, err: Any, partitions: list) -> None:
        if not self._commits:
            return
        offsets, callback, done = self._commits.popleft()
        done.is_done = True
        failed = err or next((p.error for p in partitions if p.error), None)
        if callback is not None:
            callback(offsets, KafkaError(str(failed)) if failed else None)

    def _on_assign(self, _consumer: Any, partitions: list) -> None:
        from confluent_kafka.cimpl import TopicPartition as RdTP

        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        self._assigned = set(tps)
        self._paused.clear()
        self._seeks = {}
        try:
            if self._listener is not None:
                self._listener.on_partitions_assigned(tps)
            seeks = self._seeks
        finally:
            self._seeks = None
        self._c.assign([RdTP(tp.topic, tp.partition, seeks.get(tp, OFFSET_INVALID)) for tp in tps])

    def _on_revoke(self, _consumer: Any, partitions: list) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        try:
            if self._listener is not None:
                self._listener.on_partitions_revoked(tps)
        finally:
            self._assigned -= set(tps)
            self._paused -= set(tps)
            self._c.unassign()

    # -- KafkaConsumer's calls ------------------------------------------------------------------
    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        """Join the group for `topics`; `listener` gets kafka-python's two rebalance calls."""
        self._listener = listener
        self._c.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[RdRecord]]:
        """Wait up to `timeout_ms` for records; return them per partition, as kafka-python does."""
        # consume(n, timeout) waits until it has n messages or the timeout is over, whatever
        # came before: each of the app's polls would last its whole timeout (500 ms for the
        # first of a batch). poll() returns at the first message; consume(n, 0) then takes
        # what is already fetched, without waiting.
        try:
            first = self._c.poll(timeout_ms / 1000)
            if first is None:
                return {}
            msgs = [first, *self._c.consume(self._max_records - 1, 0)] if self._max_records > 1 else [first]
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc
        out: dict[TopicPartition, list[RdRecord]] = {}
        last: TopicPartition | None = None
        recs: list[RdRecord] = []
        for m in msgs:
            if m.error() is not None:
                self._problems.note(str(m.error()))
                continue
            topic, partition = m.topic(), m.partition()
            if last is None or last.partition != partition or last.topic != topic:
                last = TopicPartition(topic, partition)
                recs = out.setdefault(last, [])
            try:
                headers = _headers(m) or []
            except (ValueError, SystemError):  # a header key that is not UTF-8
                headers = []
                self.unreadable_headers += 1
            ts_type, ts = m.timestamp()
            recs.append(RdRecord(topic, partition, m.offset(), m.value(), headers, ts if ts_type else None))
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` from `offset` next (during an assignment: where it starts)."""
        if self._seeks is not None:
            self._seeks[tp] = offset
            return
        from confluent_kafka.cimpl import TopicPartition as RdTP

        try:
            self._c.seek(RdTP(tp.topic, tp.partition, offset))
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc

    def assignment(self) -> set[TopicPartition]:
        """Return the partitions this member owns now."""
        return set(self._assigned)

    def pause(self, *tps: TopicPartition) -> None:
        """Stop fetching `tps` (kept assigned; the group still sees this member alive)."""
        self._c.pause(self._rd(tps))
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        """Fetch `tps` again."""
        self._c.resume(self._rd(tps))
        self._paused -= set(tps)

    def paused(self) -> set[TopicPartition]:
        """Return the partitions paused by pause()."""
        return set(self._paused)

    def highwater(self, tp: TopicPartition) -> int | None:
        """Return the partition's high watermark as of the last fetch (None before one)."""
        from confluent_kafka.cimpl import TopicPartition as RdTP

        try:
            _low, high = self._c.get_watermark_offsets(RdTP(tp.topic, tp.partition), cached=True)
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc
        return high if high is not None and high >= 0 else None

    def commit(self, offsets: dict) -> None:
        """Commit `offsets` ({TopicPartition: OffsetAndMetadata}) and wait for the answer."""
        try:
            self._c.commit(offsets=self._rd(offsets, offsets), asynchronous=False)
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc

    def commit_async(self, offsets: dict, callback: Callable | None = None) -> _Done:
        """Send a commit; `callback(offsets, None or error)` runs in a later poll()."""
        done = _Done()
        try:
            self._c.commit(offsets=self._rd(offsets, offsets), asynchronous=True)
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc
        self._commits.append((offsets, callback, done))
        return done

    def close(self, autocommit: bool = False) -> None:
        """Leave the group (offsets are never committed here: enable.auto.commit is off)."""
        del autocommit
        try:
            self._c.close()
        except self._exc as exc:
            raise KafkaError(str(exc)) from exc

    @staticmethod
    def _rd(tps: Iterable[TopicPartition], offsets: dict | None = None) -> list:
        from confluent_kafka.cimpl import TopicPartition as RdTP

        if offsets is None:
            return [RdTP(tp.topic, tp.partition) for tp in tps]
        return [RdTP(tp.topic, tp.partition, offsets[tp].offset) for tp in tps]

"""The Kafka side: one idempotent producer, acks=all, results funnelled to the main thread.

kafka-python resolves futures on its I/O thread; the callbacks here only put the outcome on a
queue and poke the main loop's waker, so all bookkeeping (acks, checkpoint, counters) stays
single-threaded. kafka-python has no memory cap of its own, so the agent's
`max_buffer_bytes` (bytes sent but not yet acknowledged, plus held bytes) is what bounds it.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from keplerlog.agent.config import AgentConfig
from keplerlog.kafkaauth import watch_connection_problems

log = logging.getLogger(__name__)


def batch_size(max_record_bytes: int) -> int:
    """kafka-python's `batch_size` for the agent: as large as one record may be.

    The record key keeps a module on one partition, and the idempotent producer has at most ONE
    batch in flight per partition (kafka-python mutes the partition until the batch is acked),
    so a module's throughput is one batch per acks=all round trip. The agent's records (one per
    read, <= 512 KiB) therefore queue up while a batch is in flight and go out together in the
    next one: a batch as large as `max_record_bytes` (which is set below the broker's
    message.max.bytes) carries all those read meanwhile that fit, not 1, and can never be
    refused as too large however badly the data compresses.

    `make bench` checks the one-batch limit (bench/bench_clients.py, the same records through
    kafka-python and librdkafka on one partition): kafka-python waits for the ack with its core
    half idle while librdkafka, with up to 5 batches in flight, ships more at the same CPU per
    MB; at a trickle librdkafka also costs a third of the CPU. The README has the figures.
    """
    return max(256 * 1024, max_record_bytes)


# kafka-python gives up on a batch after `delivery_timeout_ms` (default 120 s) and fails it. The
# agent would then re-send it, possibly after a later batch of the same file had been delivered
# (batches expire independently), and a Kafka outage longer than the timeout would turn into a
# storm of failures and re-sends. The agent never wants that: its own memory cap already bounds
# what waits, and the file is the durable buffer. So a batch never expires while the agent runs
# (Java's Integer.MAX_VALUE, about 24.8 days; retries are unlimited by default), and records
# complete in order once Kafka is back. Only non-retriable errors still fail a record.
DELIVERY_TIMEOUT_MS = 2**31 - 1

# What a failed record does to kafka-python's (3.0) idempotent producer depends on the error:
# retriable ones are retried for ever (above); OutOfOrderSequenceNumber, UnknownProducerId and
# InvalidProducerEpoch make it take a new producer id / epoch and fail the batches in flight,
# which the agent re-reads and sends again; every other non-retriable error (a record over the
# topic's max.message.bytes, TopicAuthorization on a rebuilt cluster whose ACLs are not back
# yet, ...) puts it in a FATAL state for good: every later batch is failed with that error, even
# once the cause is gone. Only a new producer ships again, so the agent replaces one in that
# state (`broken`, `renew`).


@dataclass(frozen=True, slots=True)
class Outcome:
    """A send result: `error` None means acknowledged by all in-sync replicas."""

    token: Any
    error: BaseException | None


class KafkaSender(Protocol):
    """What the ledger needs of a producer client: `Sender` (kafka-python) or `rdsender.RdSender`."""

    results: queue.SimpleQueue[Outcome]

    @property
    def connected(self) -> bool:
        """True once a producer exists."""

    @property
    def broker_connected(self) -> bool:
        """True while the producer holds a live broker connection (read at scrape time)."""

    @property
    def broken(self) -> bool:
        """True when the producer will never deliver again (a fatal error)."""

    @property
    def broken_reason(self) -> str:
        """Why `broken` (for the log line of the renewal)."""

    def connect(self, bootstrap_timeout_ms: int = 5000) -> bool:
        """Create the producer; False (logged) while no broker answers."""

    def renew(self) -> bool:
        """Replace the producer; unfinished records fail onto `results`."""

    def send(self, value: bytes, key: bytes, headers: list[tuple[str, bytes]], token: object) -> None:
        """Hand one record over; its outcome arrives on `results`."""

    def poke(self) -> None:
        """Send what is batched now."""

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every record to complete."""

    def close(self, timeout: float = 0) -> None:
        """Close; unacknowledged records are re-read at the next start."""


def make_sender(cfg: AgentConfig, wake: Callable[[], None]) -> KafkaSender:
    """Return the sender of the configured `kafka.client` (librdkafka imported only when chosen)."""
    if cfg.kafka.client == "librdkafka":
        from keplerlog.agent.rdsender import RdSender

        return RdSender(cfg, wake)
    return Sender(cfg, wake)


class Sender:
    """Owns the KafkaProducer; (re)connects lazily so a down cluster never stops startup."""

    def __init__(self, cfg: AgentConfig, wake: Callable[[], None]) -> None:
        self.cfg = cfg
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._wake = wake
        self._producer: Any = None
        # kafka-python's own log stays out of the agent's (quiet), but its connection errors
        # are kept to explain a failed connect
        self._problems = watch_connection_problems(quiet=logging.getLogger("kafka").level != logging.DEBUG)

    @property
    def connected(self) -> bool:
        """True once a producer exists."""
        return self._producer is not None

    @property
    def broker_connected(self) -> bool:
        """True while a producer exists and holds at least one live broker connection.

        `connected` stays True through an outage (the producer lives on and retries), so the
        metric an operator alerts on reads kafka-python's client instead: with every broker
        down it has no connection. Read at scrape time only; should the library's internals
        change, it falls back to `connected` rather than reporting an outage that is not one.
        """
        producer = self._producer
        if producer is None:
            return False
        try:
            client = producer._sender._client
            return any(client.connected(broker.node_id) for broker in client.cluster.brokers())
        except Exception:  # private internals moved: the coarser answer
            return True

    @property
    def broken(self) -> bool:
        """True when the producer is in kafka-python's fatal state: it will never deliver again."""
        manager = getattr(self._producer, "_transaction_manager", None)
        return manager is not None and bool(manager.has_fatal_error())

    @property
    def broken_reason(self) -> str:
        """The error that put the producer in its fatal state."""
        manager = getattr(self._producer, "_transaction_manager", None)
        return str(getattr(manager, "last_error", None) or "a fatal error")  # a property

    def renew(self) -> bool:
        """Replace the producer by a new one (new connections, new producer id); False if none.

        The old one is closed first: its unfinished records fail (their outcomes still arrive on
        `results`), so the caller re-reads them from the file and sends them to the new one.
        """
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=1)
            except Exception as exc:
                # close() flushes first and gives up when that times out, leaving the I/O thread
                # running: stop it the hard way (its records fail, which is what is wanted here)
                log.debug("producer close: %s", exc)
                producer._sender.force_close()
        return self.connect()

    def connect(self, bootstrap_timeout_ms: int = 5000) -> bool:
        """Create the producer; False (logged) while no broker answers."""
        # Late import (config errors must not pay for it), and from the submodule: the package
        # `kafka` itself would pull in the admin client and the consumer (memory.py).
        from kafka.producer import KafkaProducer

        k = self.cfg.kafka
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=[s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
                client_id=f"keplerlog-agent-{self.cfg.host}",
                acks="all",
                enable_idempotence=True,
                compression_type=None if k.compression == "none" else k.compression,
                linger_ms=k.linger_ms,
                batch_size=batch_size(k.max_record_bytes),
                max_request_size=max(1024 * 1024, k.max_record_bytes + 64 * 1024),
                max_block_ms=5000,
                bootstrap_timeout_ms=bootstrap_timeout_ms,
                request_timeout_ms=30000,
                **k.security.client_kwargs(),
                delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
                retry_backoff_ms=200,
                reconnect_backoff_max_ms=5000,
                metrics_enabled=False,
            )
        except Exception as exc:  # kafka-python raises several unrelated types here
            # a refused login or an unknown CA shows only in kafka-python's log: say which
            log.warning("Kafka at %s: %s", k.bootstrap_servers, self._problems.explain(exc))
            self._producer = None
            return False
        log.info("connected to Kafka at %s", k.bootstrap_servers)
        return True

    def send(self, value: bytes, key: bytes, headers: list[tuple[str, bytes]], token: object) -> None:
        """Hand one record to the producer; the outcome arrives later on `results`.

        Raises whatever the producer raises synchronously (caller treats it as a failure).
        """
        future = self._producer.send(self.cfg.kafka.topic, value=value, key=key, headers=headers)
        future.add_callback(self._ok, token)
        future.add_errback(self._fail, token)

    def _ok(self, token: object, _metadata: object) -> None:
        self.results.put(Outcome(token, None))
        self._wake()

    def _fail(self, token: object, error: BaseException) -> None:
        self.results.put(Outcome(token, error))
        self._wake()

    def poke(self) -> None:
        """Ask the producer to send what it has now (no linger), without waiting."""
        if self._producer is not None:
            self._producer._sender.wakeup()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every sent record to complete; False on timeout."""
        if self._producer is None:
            return True
        try:
            self._producer.flush(timeout=timeout)
        except Exception as exc:
            log.warning("flush did not complete: %s", exc)
            return False
        return True

    def close(self, timeout: float = 0) -> None:
        """Close the producer (records still unacknowledged are abandoned; they are re-read)."""
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout, null_logger=True)
            except Exception as exc:
                log.debug("producer close: %s", exc)
            self._producer = None

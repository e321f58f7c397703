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
from typing import Any

from keplerlog.agent.config import AgentConfig

log = logging.getLogger(__name__)


def batch_size(max_record_bytes: int) -> int:
    """kafka-python's `batch_size` for the agent: as large as one record may be.

    The record key keeps a module on one partition, and the idempotent producer has at most ONE
    batch in flight per partition (kafka-python mutes the partition until the batch is acked),
    so a module's throughput is one batch per acks=all round trip. The agent's records (one per
    read, <= 256 KiB) therefore queue up while a batch is in flight and go out together in the
    next one: a batch as large as `max_record_bytes` (which is set below the broker's
    message.max.bytes) carries 3-4 of them per round trip instead of 1, and can never be
    refused as too large however badly the data compresses.
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """A send result: `error` None means acknowledged by all in-sync replicas."""

    token: Any
    error: BaseException | None


class Sender:
    """Owns the KafkaProducer; (re)connects lazily so a down cluster never stops startup."""

    def __init__(self, cfg: AgentConfig, wake: Callable[[], None]) -> None:
        self.cfg = cfg
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._wake = wake
        self._producer: Any = None

    @property
    def connected(self) -> bool:
        """True once a producer exists."""
        return self._producer is not None

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
            log.warning("Kafka not reachable at %s: %s", k.bootstrap_servers, exc)
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

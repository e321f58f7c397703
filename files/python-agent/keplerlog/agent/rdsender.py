"""The Kafka side through librdkafka (confluent-kafka): `kafka.client: librdkafka`.

The same contract as `sender.Sender` (the ledger cannot tell them apart): one idempotent
producer, acks=all, every outcome put on `results` and the main loop woken, so all bookkeeping
stays on the main thread. Why a second client: `make bench` (bench_clients.py) measured
librdkafka at a third of kafka-python's CPU at a trickle (the agent at 200 lines/s) and with up
to 5 batches in flight per partition where kafka-python keeps one, so one module's partition
ships more per round trip. It is opt-in because confluent-kafka is a compiled wheel the service
image must carry (`pip install keplerlog[librdkafka]`).

How librdkafka's behaviour is mapped onto the agent's rules:
- Delivery reports arrive only from `poll()`: one daemon thread polls; its callbacks only queue.
- A message never times out (`message.timeout.ms` 0: infinite) for the same reason as
  sender.DELIVERY_TIMEOUT_MS: the file is the durable buffer, the agent's memory cap bounds
  what waits, and an outage of any length must end with the records delivered in order.
- librdkafka's own queue is capped a little above what the agent may have in flight, so it
  never holds more than the agent's budget; a full queue raises BufferError from `produce`,
  which the ledger treats like any failed send (backoff, re-read).
- An idempotence error librdkafka cannot recover from is *fatal* (error_cb, or raised out of
  `poll()`, which the poll thread survives): every message then fails and only a new producer
  ships again, the same `broken` / `renew` as kafka-python.
- A producer that finds a *different cluster* at its addresses (a cluster rebuilt from empty
  disks) refuses to talk to it and would wait for ever, records in flight: librdkafka only logs
  that (CLUSTERID), so the log is read for it and the producer counts as broken (renewed: a new
  one has no memory of the old cluster, re-reads its topic and starts a new producer id).
- librdkafka's own log goes to the `kafka.librdkafka` logger, kept quiet like kafka-python's
  (sender.py) unless the agent runs with --debug.
- Keys are hashed as kafka-python and the Java client hash them (`murmur2_random`; librdkafka's
  own default is CRC32): a module's records land on the same partition whichever client an
  agent runs, so a fleet that switches clients host by host keeps each module on one partition.
- `broker_connected` comes from librdkafka's statistics (each broker's state), which are
  parsed only on the scrape that asks, not every interval.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from keplerlog.agent.config import AgentConfig
from keplerlog.agent.sender import Outcome, batch_size
from keplerlog.kafkaauth import watch_connection_problems
from keplerlog.rdkit import Problems, ask_cluster, bootstrap_list, explain

log = logging.getLogger(__name__)

# How kafka.linger_ms 0 ("send each record at once", the agent's default with records of many
# lines) is given to librdkafka: batches of one record (`batch.num.messages` 1: a batch of one is
# complete, and sent, the moment it is queued) and a linger of IDLE_WAKEUP_MS, which then only
# says how long a broker thread with nothing it may send sleeps. Not `linger.ms` 0: the
# idempotent producer keeps at most 5 requests in flight per partition, and a record queued
# behind them counts as due at once (rdkafka_msg.c, rd_kafka_msgq_allow_wakeup_at: wake-up at
# max(now, queued + linger)), so the broker thread polls its socket with a zero timeout until a
# response frees a slot. Measured at 20 KB lines: 15,600 poll(..., 0) calls a second against 70
# requests, about half of the agent's CPU per MB (bench/bench_profile.py's network and "other"
# stages). A/B against linger.ms 0 in the peers harness, MB/s ratio per round: 200 B lines
# 1.43 / 1.24 / 1.32 / 1.00, 2 KB 1.07 / 0.97 / 0.96, 20 KB 1.19 / 1.10 / 0.96, each at 5-35 %
# less CPU. Costs nothing at a trickle, where a record never waits behind 5 requests.
# The linger is librdkafka's largest: it never delays a record (a batch of one is always
# complete), and a record that has waited longer than it brings the busy loop back. With a
# linger of 1 s that happened whenever a record queued for over a second, as under a backlog
# on a slow link or behind a broker paused by GC or a slow disk: a broker frozen for 4 s cost
# the agent 2.5 s of CPU in 2.5 s (test_agent_slow_broker). The broker thread still wakes at
# least once a second (its own poll timeout), whatever the linger.
IDLE_WAKEUP_MS = 900_000
STATS_INTERVAL_MS = 5000  # how fresh `broker_connected` is; JSON built by librdkafka, parsed on demand
POLL_S = 0.5  # the poll thread's wait when nothing happens (returns at once on a report)
QUEUE_SLACK_BYTES = 4 * 1024 * 1024  # librdkafka's queue above the agent's in-flight budget


class SendError(Exception):
    """A librdkafka error as an exception (the ledger logs and counts it)."""

    def __init__(self, error: Any) -> None:
        super().__init__(f"{error.name()}: {error.str()}")
        self.error = error


def client_config(cfg: AgentConfig, problems: Callable[[Any], None]) -> dict[str, Any]:
    """Return the librdkafka settings that give the same guarantees as the kafka-python producer."""
    k = cfg.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap_list(k.bootstrap_servers),
        "client.id": f"keplerlog-agent-{cfg.host}",
        "acks": "all",
        "enable.idempotence": True,
        "partitioner": "murmur2_random",  # kafka-python's and Java's key hash: see the docstring
        "max.in.flight.requests.per.connection": 5,  # idempotence keeps order up to 5
        "compression.type": k.compression,
        "linger.ms": k.linger_ms,
        **send_at_once(cfg),
        "batch.size": batch_size(k.max_record_bytes),
        "message.max.bytes": max(1024 * 1024, k.max_record_bytes + 64 * 1024),
        "message.timeout.ms": 0,  # never: see the module docstring
        "request.timeout.ms": 30000,
        "retry.backoff.ms": 200,
        "reconnect.backoff.max.ms": 5000,
        # TCP_NODELAY, as kafka-python sets it: librdkafka leaves Nagle on, and at a trickle a
        # small produce request then waits for the broker's delayed ACK of the one before it
        # (read -> broker p99 184-206 ms at 1,000 lines/s in bench_latency, 25 ms with kafka-python)
        "socket.nagle.disable": True,
        "queue.buffering.max.kbytes": (cfg.limits.max_buffer_bytes + k.max_record_bytes + QUEUE_SLACK_BYTES)
        // 1024,
        "statistics.interval.ms": STATS_INTERVAL_MS,
        "error_cb": problems,
        **k.security.rdkafka_conf(),
    }
    return conf


def send_at_once(cfg: AgentConfig) -> dict[str, Any]:
    """Return the settings that send each record at once with no busy broker thread (IDLE_WAKEUP_MS).

    Only for records of many lines: with `one_line_per_record` a record is one line and the
    producer's batching of queued records is what keeps requests per line down, so a linger of 0
    set there explicitly is left as it is.
    """
    if cfg.kafka.linger_ms or any(inp.one_line_per_record for inp in cfg.inputs):
        return {}
    return {"linger.ms": IDLE_WAKEUP_MS, "batch.num.messages": 1}


class _LogBridge:
    """librdkafka's `logger`: forwards its log to Python logging and reports a replaced cluster.

    confluent-kafka calls `log(level, "%s [%s] %s", facility, client, message)` on the poll
    thread (the log goes through the queue that `poll` serves).
    """

    def __init__(self, on_cluster_change: Callable[[str], None]) -> None:
        self._logger = logging.getLogger("kafka.librdkafka")
        self._on_cluster_change = on_cluster_change

    def log(self, level: int, fmt: str, facility: str, client: str, message: str) -> None:
        """Log one librdkafka line; a CLUSTERID line means the brokers now belong to another cluster."""
        if facility == "CLUSTERID":
            self._on_cluster_change(message)
        self._logger.log(level, fmt, facility, client, message)


class RdSender:
    """Owns the librdkafka producer and the thread that serves its delivery reports."""

    def __init__(self, cfg: AgentConfig, wake: Callable[[], None]) -> None:
        self.cfg = cfg
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._wake = wake
        self._producer: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._fatal: str | None = None  # why this producer will never deliver again
        self._problems = Problems(None, "Kafka producer")
        self._stats: str | None = None  # the latest statistics JSON, parsed when asked
        # the `kafka` loggers stay out of the agent's log as with kafka-python (sender.py)
        watch_connection_problems(quiet=logging.getLogger("kafka").level != logging.DEBUG)

    @property
    def connected(self) -> bool:
        """True once a producer exists."""
        return self._producer is not None

    @property
    def broker_connected(self) -> bool:
        """True while librdkafka's latest statistics show a bootstrap-listed or learned broker UP."""
        if self._producer is None:
            return False
        stats = self._stats
        if stats is None:
            return True  # no statistics yet: connect() has just seen the cluster answer
        try:
            brokers = json.loads(stats).get("brokers", {})
        except ValueError:
            return True
        return any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in brokers.values())

    @property
    def broken(self) -> bool:
        """True after a fatal error: this producer will never deliver again."""
        return self._fatal is not None

    @property
    def broken_reason(self) -> str:
        """The fatal error, or the cluster change."""
        return self._fatal or ""

    def _problem(self, error: Any) -> None:
        """error_cb, on the poll thread: keep the reason; remember a fatal error."""
        if error.fatal():
            self._fatal = f"{error.name()}: {error.str()}"
            self._wake()
            log.warning("Kafka producer: fatal error %s: %s", error.name(), error.str())
        else:
            self._problems.note(error.str())  # the reason connect() gives; logged there

    def _stats_cb(self, stats: str) -> None:
        self._stats = stats

    def _cluster_changed(self, message: str) -> None:
        if self._fatal is None:
            self._fatal = f"another Kafka cluster at the same addresses: {message}"
            log.warning("Kafka producer: %s", self._fatal)
            self._wake()  # the ledger renews the producer: nothing in flight would fail by itself

    def connect(self, bootstrap_timeout_ms: int = 5000) -> bool:
        """Create the producer and see the cluster answer; False (logged) while none does."""
        from confluent_kafka.cimpl import KafkaException, Producer

        k = self.cfg.kafka
        conf = client_config(self.cfg, self._problem)
        conf["stats_cb"] = self._stats_cb
        conf["logger"] = _LogBridge(self._cluster_changed)
        self._fatal = None
        self._stats = None
        self._problems.reason = None
        try:
            producer = Producer(conf)
        except KafkaException as exc:  # a setting librdkafka refuses (a bad path, ...)
            log.warning("Kafka at %s: %s", k.bootstrap_servers, exc)
            return False
        try:
            ask_cluster(producer, bootstrap_timeout_ms / 1000)
        except KafkaException as exc:
            producer.poll(0)  # serve the error_cb events that say why (no poll thread yet)
            reason = self._problems.reason or str(exc)
            log.warning("Kafka at %s: %s", k.bootstrap_servers, explain(reason))
            producer.purge()
            return False
        self._producer = producer
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll_loop, args=(producer,), daemon=True)
        self._poller.name = "keplerlog-rdkafka-poll"
        self._poller.start()
        log.info("connected to Kafka at %s (librdkafka)", k.bootstrap_servers)
        return True

    def _poll_loop(self, producer: Any) -> None:
        """Serve delivery reports and errors until stopped; an exception never ends the thread.

        confluent-kafka can raise a fatal error out of poll() instead of calling error_cb (seen:
        OUT_OF_ORDER_SEQUENCE_NUMBER against a cluster rebuilt from empty disks). The thread
        died of it, no report was served again, and the producer was never marked broken, so
        it was never renewed: every send failed with _FATAL for as long as the agent ran.
        """
        from confluent_kafka.cimpl import KafkaException

        while not self._stop.is_set():
            try:
                producer.poll(POLL_S)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if error is not None and error.fatal():
                    self._problem(error)  # broken: the ledger renews the producer
                else:
                    log.warning("Kafka producer: %s", exc)
                self._stop.wait(POLL_S)  # not a tight loop should it raise again at once
            except Exception:  # a bug in a callback: keep serving the reports
                log.exception("Kafka producer: poll failed")
                self._stop.wait(POLL_S)

    def send(self, value: bytes, key: bytes, headers: list[tuple[str, bytes]], token: object) -> None:
        """Hand one record to librdkafka; the outcome arrives later on `results`.

        Raises BufferError (librdkafka's queue full) or KafkaException synchronously.
        """
        self._producer.produce(
            self.cfg.kafka.topic,
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda error, _msg: self._done(token, error),
        )

    def _done(self, token: object, error: Any) -> None:
        self.results.put(Outcome(token, None if error is None else SendError(error)))
        self._wake()

    def poke(self) -> None:
        """Nothing to do: librdkafka sends as soon as linger.ms allows."""

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every sent record to complete; False on timeout."""
        if self._producer is None:
            return True
        return self._producer.flush(timeout) == 0

    def _drop(self) -> None:
        """Fail what is unfinished (reports with _PURGE_*), deliver those reports, stop the thread."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        producer.purge()
        producer.poll(0)  # the purged messages' reports, before the producer goes away

    def renew(self) -> bool:
        """Replace the producer (new connections, new producer id); False if no broker answers.

        The old one's unfinished records fail (their outcomes arrive on `results`), so the
        caller re-reads them from the file and sends them to the new one.
        """
        self._drop()
        return self.connect()

    def close(self, timeout: float = 0) -> None:
        """Close the producer (records still unacknowledged are abandoned; they are re-read)."""
        if self._producer is not None and timeout > 0:
            self._producer.flush(timeout)
        self._drop()

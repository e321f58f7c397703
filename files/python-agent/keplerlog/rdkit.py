"""librdkafka (confluent-kafka) helpers that the agent's producer and the consumer share.

Kept apart from both so the consumer does not import the agent's sender (kafka-python's
producer) and the agent does not import the consumer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

PROBLEM_LOG_EVERY_S = 60.0  # at most one warning per kind of problem per this many seconds


def bootstrap_list(servers: str) -> str:
    """Return a comma-separated broker list as librdkafka wants it (no blanks, no empty items)."""
    return ",".join(s.strip() for s in servers.split(",") if s.strip())


def explain(reason: str) -> str:
    """Put a librdkafka connection error in the words sender.py's explanations use."""
    low = reason.lower()  # the broker's address may read sasl_ssl://...: match the words of the error
    if "certificate verify failed" in low and ("hostname" in low or "ip address mismatch" in low):
        return f"the broker's certificate does not name the host in bootstrap_servers [{reason}]"
    if "certificate verify failed" in low:
        return f"the broker's certificate is not signed by kafka.security.cafile's CA [{reason}]"
    if "authentication" in low:
        return f"login refused: wrong user name or password (check kafka.security) [{reason}]"
    return f"not reachable [{reason}]"


def is_generic(reason: str) -> bool:
    """Tell whether a cause says no more than "not reachable" (no login or certificate problem)."""
    return explain(reason).startswith("not reachable")


def ask_cluster(client: Any, timeout_s: float) -> None:
    """Return once the cluster answered a metadata request; KafkaException when none did in time.

    `cluster_id` (confluent-kafka 2.16+) answers with a string. `list_topics`, the fallback for
    older releases, wraps its answer in `confluent_kafka.admin` classes: importing that module
    runs confluent-kafka's package `__init__` (its asyncio client, ssl, serializers), ~5 MB of
    the agent's resident set that nothing else needs (see lazyinit.py).
    """
    ask = getattr(client, "cluster_id", None)
    if ask is not None:
        ask(timeout=timeout_s)
    else:
        client.list_topics(timeout=timeout_s)


class Problems:
    """A librdkafka client's connection problems: the one to give as the reason, and its warnings.

    librdkafka calls error_cb at every reconnect of every broker, with texts that differ each
    time (the broker's address, "N identical error(s) suppressed"): a warning per new text was one
    every few seconds for as long as Kafka was away. Warnings are limited to one per kind of
    problem (not reachable, login refused, certificate) per `every_s`, each saying how many more
    came since. A refused login or certificate stays the reason over the generic disconnects
    that follow it, which say less. `log` None keeps the reason only (the agent's producer, whose
    outage handling logs its own summary).
    """

    def __init__(
        self,
        log: logging.Logger | None,
        what: str,
        every_s: float = PROBLEM_LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reason: str | None = None
        self._log, self._what, self._every, self._clock = log, what, every_s, clock
        self._next: dict[str, float] = {}  # kind -> when its next warning may be logged
        self._unlogged: dict[str, int] = {}  # kind -> problems since its last warning

    def note(self, problem: str) -> None:
        """Keep `problem` as the reason unless it says less than the one kept; warn if due."""
        last = self.reason
        if last is None or is_generic(last) or not is_generic(problem):
            self.reason = problem
        if self._log is None:
            return
        explained = explain(problem)
        kind = explained.split(" [", 1)[0]
        now = self._clock()
        if now < self._next.get(kind, now):
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        more = self._unlogged.pop(kind, 0)
        suffix = f" ({more} more since the last such warning)" if more else ""
        self._log.warning("%s: %s%s", self._what, explained, suffix)
        self._next[kind] = now + self._every

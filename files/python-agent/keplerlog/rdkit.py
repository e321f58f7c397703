"""librdkafka (confluent-kafka) helpers that the agent's producer and the consumer share.

Kept apart from both so the consumer does not import the agent's sender (kafka-python's
producer) and the agent does not import the consumer.
"""

from __future__ import annotations

from typing import Any


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

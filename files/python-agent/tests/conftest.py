"""Shared fixtures: one real Kafka broker per test session, a fresh topic per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from keplerlog.testing.kafka_node import KafkaCluster


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A real single-node KRaft Kafka started from dist/kafka (run `make kafka-dist` first)."""
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka"), size=1)
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def topic(kafka: KafkaCluster) -> str:
    """A fresh 4-partition topic for one test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kafka.create_topic(name, partitions=4, replication=1)
    return name

"""Fixtures of the agent's real-Kafka tests: a topic reader and a log directory."""

from __future__ import annotations

import pytest
from agent_support import TopicReader

from keplerlog.kafkaauth import CLIENTS


@pytest.fixture(params=CLIENTS)
def client(request) -> str:
    """The producer client (`kafka.client`): tests that take it run once with each."""
    return request.param


@pytest.fixture
def reader(kafka, topic):
    r = TopicReader(kafka.bootstrap, topic)
    yield r
    r.close()


@pytest.fixture
def logdir(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    return d

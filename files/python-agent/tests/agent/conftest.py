"""Fixtures of the agent's real-Kafka tests: a topic reader and a log directory."""

from __future__ import annotations

import pytest
from agent_support import Rig, TopicReader

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


@pytest.fixture
def rig_factory(tmp_path):
    rigs: list[Rig] = []

    def make(**kw) -> Rig:
        rigs.append(Rig(tmp_path, **kw))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()

"""The agent against a real Kafka broker (the session `kafka` fixture)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, TopicReader, append, lines, write_config

pytestmark = pytest.mark.kafka


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


def _agent(tmp_path, kafka, topic, logdir, **over) -> AgentProcess:
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")], **over)
    return AgentProcess(cfg, tmp_path / "agent.out")


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]


def test_ships_existing_and_later_files_and_sigterm_drains(tmp_path, kafka, topic, logdir, reader):
    a = logdir / "a.log"
    a.write_bytes(lines("a", 1000))
    agent = _agent(tmp_path, kafka, topic, logdir).start()
    try:
        reader.wait_contents({str(a): [a.read_bytes()]})
        b = logdir / "b.log"
        append(b, lines("b", 10))
        append(a, lines("a", 10, 1000))
        reader.wait_contents({str(a): [a.read_bytes()], str(b): [b.read_bytes()]})
        append(b, b"partial line without newline")
        time.sleep(0.3)
    finally:
        assert agent.stop() == 0, agent.output()
    reader.wait_contents({str(b): [b.read_bytes()]})
    state = _state(tmp_path)
    assert sorted(v["offset"] for v in state.values()) == sorted([a.stat().st_size, b.stat().st_size])

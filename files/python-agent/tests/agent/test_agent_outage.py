"""Kafka down, then up again: the agent stops reading at max_buffer_bytes and loses nothing."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
from agent_support import AgentProcess, TopicReader, append, lines, write_config

from keplerlog.testing.kafka_node import KafkaCluster, free_port

pytestmark = pytest.mark.kafka


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def test_kafka_down_then_up(tmp_path):
    cluster = KafkaCluster(tmp_path / "kafka", size=1)
    cluster.start()
    reader = None
    agent = None
    try:
        cluster.create_topic("outage", partitions=4, replication=1)
        logdir = tmp_path / "logs"
        logdir.mkdir()
        log = logdir / "app.log"
        port = free_port()
        cfg = write_config(
            tmp_path,
            cluster.bootstrap,
            "outage",
            [str(logdir / "*.log")],
            limits={"max_buffer_bytes": 1_000_000},
            metrics={"port": port},
            kafka={"max_record_bytes": 100_000},
        )
        agent = AgentProcess(cfg, tmp_path / "agent.out").start()
        reader = TopicReader(cluster.bootstrap, "outage")
        append(log, lines("up", 100))
        reader.wait_contents({str(log): [log.read_bytes()]})
        reader.close()
        reader = None
        for node in cluster.nodes:
            node.stop(signal.SIGKILL)  # a crash; also much faster than a clean shutdown
        append(log, lines("down", 100_000, width=100))  # 10 MB while Kafka is down
        time.sleep(4)
        m = _metrics(port)
        assert m["keplerlog_agent_bytes_read_total"] < 2_500_000  # stopped reading at the cap
        assert m["keplerlog_agent_inflight_bytes"] <= 1_000_000
        acked = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]
        assert [v["offset"] for v in acked.values()] == [len(lines("up", 100))]
        for node in cluster.nodes:
            node.start()
        cluster.wait_ready()
        reader = TopicReader(cluster.bootstrap, "outage")
        reader.wait_contents({str(log): [log.read_bytes()]}, timeout=90)
        assert agent.stop() == 0, agent.output()
    finally:
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
        if reader is not None:
            reader.close()
        cluster.destroy()

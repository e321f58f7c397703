"""Kafka down for longer than every client timeout, under load: nothing lost, no restart.

The producer's timeouts (request 30 s; kafka-python's default delivery timeout of 120 s and
librdkafka's message timeout of 300 s, both turned off by the agent) are all shorter than the
outage, which runs once per client. While Kafka is down the agent reads up to
`max_buffer_bytes` and then pauses; it must resume by itself within 10 s of Kafka coming back,
and every line must arrive, in order, with no gap.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from agent_support import AgentProcess, LiveWriter, TopicReader, append, lines, logs_and_config

from keplerlog.testing.kafka_node import KafkaCluster

pytestmark = pytest.mark.kafka

# Past each client's own give-up time: kafka-python's delivery timeout is 120 s, librdkafka's
# message.timeout.ms 300 s (rdsender.py turns it off); KEPLERLOG_TEST_OUTAGE_S sets both.
OUTAGE_S = {"kafka-python": 150.0, "librdkafka": 320.0}
OUTAGE_ENV = os.environ.get("KEPLERLOG_TEST_OUTAGE_S")
CAP = 1_000_000
RESUME_S = 10


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


PAUSED_MEMORY = 'keplerlog_agent_paused{reason="memory"}'
CONNECTED = "keplerlog_agent_kafka_connected"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_kafka_down_longer_than_every_client_timeout(tmp_path, client):
    outage_s = float(OUTAGE_ENV) if OUTAGE_ENV else OUTAGE_S[client]
    cluster = KafkaCluster(tmp_path / "kafka", size=1)
    cluster.start()
    reader = None
    agent = None
    writer = None
    try:
        cluster.create_topic("outage", partitions=4, replication=1)
        logdir, port, cfg = logs_and_config(
            tmp_path,
            cluster.bootstrap,
            "outage",
            client,
            limits={"max_buffer_bytes": CAP},
            kafka={"max_record_bytes": 100_000},
        )
        log = logdir / "app.log"
        bulk = logdir / "bulk.log"
        agent = AgentProcess(cfg, tmp_path / "agent.out").start()
        assert agent.proc is not None
        pid = agent.proc.pid
        writer = LiveWriter(log)
        writer.start()
        reader = TopicReader(cluster.bootstrap, "outage")
        reader.wait_for(lambda: bool(reader.records))
        reader.close()
        reader = None
        assert _metrics(port)[CONNECTED] == 1
        for node in cluster.nodes:
            node.stop(signal.SIGKILL)  # a crash; also much faster than a clean shutdown
        down_at = time.monotonic()
        append(bulk, lines("down", 100_000, width=100))  # 10 MB at once while Kafka is down
        peak_inflight = peak_rss = 0.0
        max_read = 0.0
        paused_samples, connected_samples = [], []
        while time.monotonic() - down_at < outage_s:
            m = _metrics(port)
            peak_inflight = max(peak_inflight, m["keplerlog_agent_inflight_bytes"])
            max_read = m["keplerlog_agent_bytes_read_total"]
            paused_samples.append(m[PAUSED_MEMORY])
            connected_samples.append(m[CONNECTED])
            peak_rss = max(peak_rss, _rss_mb(pid))
            assert agent.proc.poll() is None, agent.output()
            time.sleep(2)
        # the fault happened: the agent held unacknowledged bytes, and paused at its cap
        assert peak_inflight > 0
        assert peak_inflight <= CAP
        assert max_read < 2.5 * CAP + writer.n * 100, "kept reading past its buffer cap"
        assert peak_rss < 80, f"RSS {peak_rss:.0f} MB during the outage"
        # and said so: paused for memory in most samples once the 10 MB were waiting
        assert sum(paused_samples) >= len(paused_samples) // 2, paused_samples
        # and that Kafka is away: no broker connection after the first seconds (the alert's input)
        assert sum(connected_samples[5:]) == 0, connected_samples
        acked_before = _metrics(port)["keplerlog_agent_bytes_acked_total"]
        for node in cluster.nodes:
            node.start()
        cluster.wait_ready()
        up_at = time.monotonic()
        while _metrics(port)["keplerlog_agent_bytes_acked_total"] <= acked_before:
            assert time.monotonic() - up_at < RESUME_S, "no ack within 10 s of Kafka coming back"
            time.sleep(0.2)
        resumed = time.monotonic() - up_at
        time.sleep(3)  # keep writing after the outage
        writer.done.set()
        writer.join()
        reader = TopicReader(cluster.bootstrap, "outage")
        # content() asserts no gap and that every replay equals what it replays
        reader.wait_contents({str(log): [log.read_bytes()], str(bulk): [bulk.read_bytes()]}, timeout=120)
        assert agent.proc.pid == pid and agent.proc.poll() is None, "the agent restarted"
        assert _metrics(port)[PAUSED_MEMORY] == 0  # everything shipped: reading is not paused
        assert _metrics(port)[CONNECTED] == 1
        assert agent.stop() == 0, agent.output()
        state = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]
        sizes = sorted([log.stat().st_size, bulk.stat().st_size])
        assert sorted(v["offset"] for v in state.values()) == sizes
        print(
            f"outage {outage_s:.0f} s ({client}): peak in flight {peak_inflight:.0f} B, "
            f"peak RSS {peak_rss:.1f} MB, first ack {resumed:.1f} s after Kafka was ready, "
            f"{writer.n} live lines"
        )
    finally:
        if writer is not None:
            writer.done.set()
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
        if reader is not None:
            reader.close()
        cluster.destroy()

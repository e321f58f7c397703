"""A broker that stops answering for seconds, under a backlog: the agent sleeps, then ships it all.

With librdkafka and the default `kafka.linger_ms` 0 the agent gives librdkafka batches of one
record and a linger of `rdsender.IDLE_WAKEUP_MS` (see rdsender.py): a record waiting behind the
idempotent producer's 5 requests in flight makes the broker thread poll its socket in a loop once
it has waited longer than the linger. Queue waits of seconds are normal under a backlog or a
broker pause (GC, a slow disk, a slow link), so the broker here is frozen (SIGSTOP) for
`STALL_S`, four times the linger the agent had before (1 s), with requests in flight and
records queued behind them. Through the stall the agent must use next to no CPU, and after it
every line must arrive exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, TopicReader, append, lines, logs_and_config, metrics

from keplerlog.agent import rdsender
from keplerlog.testing.kafka_node import KafkaCluster

pytestmark = pytest.mark.kafka

STALL_S = 4.0
OLD_LINGER_S = 1.0  # what IDLE_WAKEUP_MS was: the CPU is measured only after a record waited longer
MAX_CPU_S = 0.3  # agent CPU (all threads) over the measured part of the stall; a busy loop is ~2.5 s


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_broker_frozen_past_the_linger_costs_no_cpu_and_loses_nothing(tmp_path):
    assert rdsender.IDLE_WAKEUP_MS / 1000 > STALL_S, "the stall is meant to stay under the linger"
    cluster = KafkaCluster(tmp_path / "kafka", size=1)
    cluster.start()
    agent = None
    reader = None
    node = cluster.nodes[0]
    try:
        cluster.create_topic("stall", partitions=4, replication=1)
        logdir, port, cfg = logs_and_config(
            tmp_path,
            cluster.bootstrap,
            "stall",
            "librdkafka",
            kafka={"linger_ms": 0, "max_record_bytes": 100_000},
            limits={"max_buffer_bytes": 4_000_000},
        )
        bulk = logdir / "bulk.log"
        agent = AgentProcess(cfg, tmp_path / "agent.out").start()
        assert agent.proc is not None
        pid = agent.proc.pid
        append(bulk, lines("before", 1000, width=200))
        reader = TopicReader(cluster.bootstrap, "stall")
        reader.wait_contents({str(bulk): [bulk.read_bytes()]})  # connected, producer id known
        append(bulk, lines("stall", 500_000, width=200))  # 100 MB: far more than one stall ships
        start = time.monotonic()
        while metrics(port)["keplerlog_agent_bytes_acked_total"] < 20_000_000:
            assert time.monotonic() - start < 60, "the backlog never started to ship"
            time.sleep(0.05)
        assert node.process is not None
        os.killpg(node.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            acked_at_stop = metrics(port)["keplerlog_agent_bytes_acked_total"]
            time.sleep(OLD_LINGER_S + 0.5)
            cpu_from = _cpu_s(pid)
            window_from = time.monotonic()
            time.sleep(STALL_S - (window_from - stopped))
            cpu = _cpu_s(pid) - cpu_from
            window = time.monotonic() - window_from
            during = metrics(port)
        finally:
            os.killpg(node.process.pid, signal.SIGCONT)
        # the fault happened: nothing acknowledged while frozen, records in flight and queued
        assert during["keplerlog_agent_bytes_acked_total"] - acked_at_stop < 1_000_000, during
        assert during["keplerlog_agent_inflight_bytes"] >= 1_000_000, during
        assert window >= 2.0
        # asleep, not polling in a loop
        assert cpu < MAX_CPU_S, f"agent used {cpu:.2f} s of CPU in {window:.1f} s of a frozen broker"
        # and the whole backlog arrives, exactly once (wait_contents checks gaps and replays)
        reader.wait_contents({str(bulk): [bulk.read_bytes()]}, timeout=240)
        assert agent.proc.poll() is None, agent.output()
        assert agent.stop() == 0, agent.output()
    finally:
        if reader is not None:
            reader.close()
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
        cluster.destroy()

"""What TLS + SCRAM costs: agent and consumer throughput over SASL_SSL as a ratio to plaintext.

One single-node secure Kafka (keplerlog.testing.kafka_node, secure=True) with two listeners on
the same broker: SASL_SSL with SCRAM-SHA-512 and the StandardAuthorizer (what the kafka role
deploys), and a loopback PLAINTEXT one. Every run ships (agent) or reads (consumer) the same
data through one of them; the two modes alternate, `--runs` times each, so both see the same
machine state (the order flips every round); medians and the spread of the runs are reported,
and the ratio of the medians.

Usage: .venv/bin/python bench/bench_security.py --out bench/results/security.json
       [--lines 2000000] [--mb 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_agent import bench_throughput  # bench/ is sys.path[0]
from bench_consumer import make_pool, preload, run_consumer
from keplerlog.testing.kafka_node import KafkaCluster

ROOT = Path(__file__).resolve().parents[1]
AGENT, CONSUMER = "bench-agent", "bench-consumer"


def password_file(work: Path, name: str, password: str) -> str:
    path = work / f"{name}.password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def order(modes: dict, i: int) -> list:
    """The modes of round i, first-to-last on even rounds and reversed on odd ones, so a trend
    over the run (caches warming, page cache filling) does not favour one mode."""
    items = list(modes.items())
    return items if i % 2 == 0 else items[::-1]


def summary(values: list[float]) -> dict:
    """Median and spread of one mode's runs."""
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "security.json")
    parser.add_argument("--lines", type=int, default=2_000_000, help="200-byte lines per agent run")
    parser.add_argument("--mb", type=int, default=1024, help="MB per consumer run")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (alternating)")
    parser.add_argument("--core", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kl-bench-sec-"))
    cluster = KafkaCluster(work / "kafka", size=1, secure=True)
    result: dict = {"params": vars(args) | {"out": str(args.out), "cpus": os.cpu_count()}}
    try:
        cluster.start()
        assert cluster.pki is not None
        agent_pw, consumer_pw = os.urandom(12).hex(), os.urandom(12).hex()
        cluster.add_user(AGENT, agent_pw)
        cluster.add_user(CONSUMER, consumer_pw)
        agent_sec = {
            "protocol": "sasl_ssl",
            "cafile": str(cluster.pki.ca),
            "username": AGENT,
            "password_file": password_file(work, AGENT, agent_pw),
        }
        consumer_sec = agent_sec | {
            "username": CONSUMER,
            "password_file": password_file(work, CONSUMER, consumer_pw),
        }
        modes = {
            "plaintext": (cluster.admin_bootstrap, None, None),
            "sasl_ssl": (cluster.bootstrap, agent_sec, consumer_sec),
        }

        agent_runs: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args.runs):
            for mode, (bootstrap, sec, _) in order(modes, i):
                topic = f"agent-{mode}-{i}"
                if sec:
                    cluster.allow(AGENT, "WRITE", "TOPIC", topic)
                # the same file every run (written once), a fresh agent state and topic per run
                r = bench_throughput(
                    work / "agent",
                    cluster,
                    args.lines,
                    args.core,
                    topic=topic,
                    bootstrap=bootstrap,
                    security=sec,
                )
                agent_runs[mode].append(r["lines_per_s"])
                print(f"agent {mode} run {i}: {r['lines_per_s']} lines/s")

        topic = "consumer-data"
        cluster.create_topic(topic, partitions=4, replication=1)
        cluster.allow(CONSUMER, "READ", "TOPIC", topic)
        pool = make_pool(32, 64 * 1024, 1024, random.Random(1))
        loaded = preload(cluster.admin_bootstrap, topic, args.mb * 1_000_000, pool, 8, "lz4")
        consumer_runs: dict[str, list[float]] = {m: [] for m in modes}
        complete = True
        for i in range(args.runs):
            for mode, (bootstrap, _, sec) in order(modes, i):
                group = f"bench-{mode}-{i}"
                if sec:
                    cluster.allow(CONSUMER, "READ", "GROUP", group)
                r = run_consumer(
                    bootstrap, topic, work, loaded["bytes"], timeout=600, group=group, security=sec
                )
                complete = complete and r["complete"]
                consumer_runs[mode].append(r["mb_s"])
                print(f"consumer {mode} run {i}: {r['mb_s']:.1f} MB/s")
                shutil.rmtree(work / "root", ignore_errors=True)
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)

    for part, runs, unit in (("agent", agent_runs, "lines_per_s"), ("consumer", consumer_runs, "mb_s")):
        plain, secure = summary(runs["plaintext"]), summary(runs["sasl_ssl"])
        result[part] = {
            "unit": unit,
            "plaintext": plain,
            "sasl_ssl": secure,
            "runs": runs,
            "ratio": round(secure["median"] / plain["median"], 2),
        }
        print(f"{part}: sasl_ssl / plaintext = {result[part]['ratio']} ({secure} vs {plain} {unit})")
    result["complete"] = complete
    result["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())

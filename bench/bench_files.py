"""Benchmark the agent with many files: CPU, RSS and how soon a new file is seen.

For 100, 1,000 and 10,000 idle files (one line each, already shipped) next to one active file
written at a steady 200 lines/s, with the agent at its defaults and pinned to one core:
  * CPU (% of one core) with only the idle files (over two periods of the agent's safety-net
    rescan at least), and with the active file too;
  * RSS (VmRSS) at the end;
  * the delay from creating a new file (one line) until its record is readable in Kafka
    (median and max of 5 new files).
Targets (issue "thousands of files"): idle CPU <= 1 % of a core at 10,000 files, RSS <= 60 MB,
new-file delay <= 1 s.

Usage: .venv/bin/python bench/bench_files.py --out bench/results/files.json [--sizes 100,1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_agent import Agent, cpu_seconds, metrics, proc_status, replication, steady_writer
from kafka import KafkaConsumer
from keplerlog.agent.fileset import RESCAN_WATCHED_S
from keplerlog.record import decode_headers, is_watermark
from keplerlog.testing.kafka_node import KafkaCluster

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"idle_cpu_percent": 1.0, "rss_mb": 60.0, "new_file_delay_s": 1.0}


def wait_shipped(port: int, total: int, timeout: float) -> float:
    """Seconds until the agent acknowledged `total` bytes."""
    t0 = time.monotonic()
    while metrics(port).get("bytes_acked_total", 0) < total:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {metrics(port).get('bytes_acked_total')} of {total} bytes acked")
        time.sleep(0.2)
    return time.monotonic() - t0


def cpu_percent(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def new_file_delays(logs: Path, bootstrap: str, topic: str, trials: int = 5) -> list[float]:
    """Create `trials` new files one by one; time each until its record is readable."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="latest", group_id=None)
    try:
        while not consumer.assignment():
            consumer.poll(timeout_ms=200)
        consumer.poll(timeout_ms=500)
        delays = []
        for i in range(trials):
            path = logs / f"new-{i}.log"
            t0 = time.monotonic()
            path.write_bytes(f"new file {i}\n".encode())
            seen = False
            while not seen:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError(f"{path} not in Kafka after 30 s")
                for recs in consumer.poll(timeout_ms=50).values():
                    seen = seen or any(
                        decode_headers(r.headers).path == str(path)
                        for r in recs
                        if not is_watermark(r.headers)
                    )
            delays.append(time.monotonic() - t0)
            time.sleep(1)
        return delays
    finally:
        consumer.close()


def one_size(work: Path, cluster: KafkaCluster, n: int, core: int, seconds: float) -> dict:
    topic = f"bench-files-{n}"
    cluster.create_topic(topic, partitions=4, replication=replication(cluster))
    logs = work / f"logs-{n}"
    logs.mkdir(parents=True)
    total = 0
    for i in range(n):
        data = f"idle file {i:06d} its only line\n".encode()
        (logs / f"idle-{i:06d}.log").write_bytes(data)
        total += len(data)
    active = logs / "active.log"
    active.touch()
    agent = Agent(work, cluster.bootstrap, topic, logs / "*.log", core)
    try:
        shipped_s = wait_shipped(agent.port, total, timeout=300)
        time.sleep(8)  # idle files settle (closed when more wait than may be open)
        # The idle agent's work is periodic (the safety-net rescan every RESCAN_WATCHED_S): a
        # window of whole periods counts it in proportion, a shorter one may miss it.
        idle_s = max(seconds, 2 * RESCAN_WATCHED_S)
        idle = cpu_percent(agent.proc.pid, idle_s)
        stop = threading.Event()
        writer = threading.Thread(
            target=steady_writer, args=(active, 200, seconds + 3, stop, "active", 1 / 200)
        )
        writer.start()
        time.sleep(3)
        busy = cpu_percent(agent.proc.pid, seconds)
        writer.join()
        delays = new_file_delays(logs, cluster.bootstrap, topic)
        rss = proc_status(agent.proc.pid, "VmRSS") / 1024
        m = metrics(agent.port)
    finally:
        agent.stop()
        shutil.rmtree(logs, ignore_errors=True)
    return {
        "files": n,
        "initial_ship_s": round(shipped_s, 1),
        "idle_cpu_percent": round(idle, 2),
        "cpu_percent_with_200_lines_s": round(busy, 2),
        "rss_mb": round(rss, 1),
        "new_file_delay_s_median": round(statistics.median(delays), 3),
        "new_file_delay_s_max": round(max(delays), 3),
        "files_open": m.get("files_open"),
        "files_open_limit": m.get("files_open_limit"),
        "seconds": seconds,
        "idle_seconds": idle_s,
    }


def main() -> int:
    """Measure each size; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "files.json")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="files-", dir=args.work))
    cluster = KafkaCluster(work / "kafka", size=args.brokers)
    rows = []
    try:
        cluster.start()
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(one_size(work, cluster, n, args.core, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)
    worst = rows[-1]
    met = {
        "idle_cpu_percent": worst["idle_cpu_percent"] <= TARGETS["idle_cpu_percent"],
        "rss_mb": max(r["rss_mb"] for r in rows) <= TARGETS["rss_mb"],
        "new_file_delay_s": max(r["new_file_delay_s_max"] for r in rows) <= TARGETS["new_file_delay_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "targets": TARGETS, "met": met}, indent=2) + "\n")
    print(f"wrote {args.out}; targets met: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

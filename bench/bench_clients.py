"""Producer clients: kafka-python (what the agent uses) against librdkafka (confluent-kafka).

Issue 12 asks whether the agent's producer is what keeps it behind kcat, and what its CPU at a
trickle is made of. This part sends the agent's kind of records, the same bytes through both
clients, from a child process pinned to one core, the clients alternating (A B, B A, ...):

  * trickle: 10 records/s of 20 lines x 200 B (the agent at 200 lines/s reads every
    `read_coalesce_ms` = 100 ms: one record per read), `--trickle-s` seconds; CPU % of a core
    of the whole process (the client's I/O threads included);
  * one partition: `--partition-s` seconds of 64 KiB records of 2 KB lines under ONE key (the agent keys by
    `{service}/{module}`: a file's records share a partition), at most 3 MiB in flight (the
    agent's default `max_buffer_bytes`); MB/s and CPU % of a core.

Both clients as the agent configures kafka-python: acks=all, idempotence, lz4, linger 0, a
batch up to 1 MB, no delivery timeout. kafka-python sends one batch per partition at a time
with idempotence (it mutes the partition until the ack); librdkafka keeps up to 5 in flight.
Usage:

    .venv/bin/python bench/bench_clients.py --out bench/results/clients.json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from peers.harness import WORK_DIR, create_topic, exit_on_sigterm, kafka_cluster, machine_info, make_line

CLIENTS = ("kafka-python", "librdkafka")
RECORD_BYTES = 64 * 1024
MAX_INFLIGHT_BYTES = 3 * 1024 * 1024  # the agent's default max_buffer_bytes
TRICKLE_RECORD = b"".join(f"{i:04d} ".encode().ljust(199, b"x") + b"\n" for i in range(20))
HEADERS = [("kl.v", b"1"), ("kl.file", b"0123456789abcdef"), ("kl.lines", b"20")]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _records(line: int = 2000, count: int = 64) -> list[bytes]:
    """`count` different 64 KiB records of app-log-like lines (peers.harness.make_line): text
    that lz4 compresses as it does real logs, not a repeated block it shrinks to nothing."""
    rng = random.Random(7)
    per = RECORD_BYTES // line
    return [b"".join(make_line(r * per + i, line, rng) for i in range(per)) for r in range(count)]


class _Window:
    """At most MAX_INFLIGHT_BYTES unacknowledged: the agent's memory cap."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.inflight = 0
        self.errors = 0

    def sent(self, n: int) -> None:
        with self.cv:
            while self.inflight + n > MAX_INFLIGHT_BYTES:
                self.cv.wait()
            self.inflight += n

    def done(self, n: int, failed: bool) -> None:
        with self.cv:
            self.inflight -= n
            self.errors += failed
            self.cv.notify_all()

    def wait_empty(self) -> None:
        with self.cv:
            while self.inflight:
                self.cv.wait()


class KafkaPython:
    """kafka-python as agent/sender.py configures it."""

    def __init__(self, bootstrap: str) -> None:
        from kafka.producer import KafkaProducer

        self.p = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            acks="all",
            enable_idempotence=True,
            compression_type="lz4",
            linger_ms=0,
            batch_size=900_000,
            max_request_size=1024 * 1024 + 64 * 1024,
            delivery_timeout_ms=2**31 - 1,
            metrics_enabled=False,
        )

    def send(self, topic: str, value: bytes, window: _Window) -> None:
        future = self.p.send(topic, value=value, key=b"bench/clients", headers=HEADERS)
        future.add_callback(lambda _m: window.done(len(value), False))
        future.add_errback(lambda _e: window.done(len(value), True))

    def close(self) -> None:
        self.p.flush()
        self.p.close()


class Librdkafka:
    """confluent-kafka with the same settings; a thread serves the delivery reports."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer

        self.p = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "compression.type": "lz4",
                "linger.ms": 0,
                "batch.size": 900_000,
                "message.max.bytes": 1024 * 1024 + 64 * 1024,
                "message.timeout.ms": 0,  # no delivery timeout, as the agent's kafka-python
                "queue.buffering.max.kbytes": 2 * MAX_INFLIGHT_BYTES // 1024,
            }
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            self.p.poll(0.5)

    def send(self, topic: str, value: bytes, window: _Window) -> None:
        def report(err: Any, _msg: Any, n: int = len(value)) -> None:
            window.done(n, err is not None)

        self.p.produce(topic, value=value, key=b"bench/clients", headers=HEADERS, on_delivery=report)

    def close(self) -> None:
        self.p.flush()
        self.stop.set()
        self.thread.join()


def child(client: str, mode: str, bootstrap: str, topic: str, amount: float) -> dict[str, Any]:
    """One measurement in this (pinned) process, `amount` seconds long (plus the last acks)."""
    producer = (KafkaPython if client == "kafka-python" else Librdkafka)(bootstrap)
    window = _Window()
    window.sent(len(TRICKLE_RECORD))  # connect and warm up outside the measurement
    producer.send(topic, TRICKLE_RECORD, window)
    window.wait_empty()
    c0, t0 = _cpu(), time.monotonic()
    sent_bytes = 0
    if mode == "trickle":
        n = 0
        while time.monotonic() - t0 < amount:
            window.sent(len(TRICKLE_RECORD))
            producer.send(topic, TRICKLE_RECORD, window)
            sent_bytes += len(TRICKLE_RECORD)
            n += 1
            time.sleep(max(0.0, t0 + n * 0.1 - time.monotonic()))
    else:
        records = _records()
        while time.monotonic() - t0 < amount:
            value = records[sent_bytes // RECORD_BYTES % len(records)]
            window.sent(len(value))
            producer.send(topic, value, window)
            sent_bytes += len(value)
    window.wait_empty()
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    producer.close()
    return {
        "client": client,
        "mode": mode,
        "seconds": round(wall, 2),
        "cpu_percent": round(100 * cpu / wall, 2),
        "mb_per_s": round(sent_bytes / 1e6 / wall, 1),
        "errors": window.errors,
    }


def run_child(client: str, mode: str, bootstrap: str, topic: str, amount: float, core: int) -> dict:
    cmd = [sys.executable, __file__, "--child", client, mode, bootstrap, topic, str(amount)]
    if core < (os.cpu_count() or 1):
        cmd = ["taskset", "-c", str(core), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        return {"client": client, "mode": mode, "error": " ".join(out.stderr.split())[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and client: the median and spread of CPU % and MB/s over the good runs."""
    rows = []
    for mode in ("trickle", "partition"):
        for client in CLIENTS:
            ok = [r for r in runs if r["mode"] == mode and r["client"] == client and "error" not in r]
            bad = [r for r in runs if r["mode"] == mode and r["client"] == client and "error" in r]
            row: dict[str, Any] = {"mode": mode, "client": client, "runs": len(ok), "failed": len(bad)}
            for key in ("cpu_percent", "mb_per_s"):
                vals = [r[key] for r in ok]
                if vals:
                    row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            if ok:
                per_mb = [r["cpu_percent"] / 100 / r["mb_per_s"] for r in ok if r["mb_per_s"]]
                row["cpu_s_per_mb"] = round(statistics.median(per_mb), 4) if per_mb else None
            if bad:
                row["error"] = bad[0]["error"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Start a 3-node cluster, run every client and mode `--rounds` times alternating, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trickle-s", type=float, default=20)
    ap.add_argument("--partition-s", type=float, default=15)
    ap.add_argument("--core", type=int, default=1, help="the core the clients are pinned to")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        print("confluent-kafka is not installed (make venv installs it: requirements.txt)", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with kafka_cluster(WORK_DIR / "kafka-clients") as cluster:
        bootstrap = cluster.bootstrap  # type: ignore[attr-defined]
        for rnd in range(args.rounds):
            order = CLIENTS if rnd % 2 == 0 else tuple(reversed(CLIENTS))
            for mode, amount in (("trickle", args.trickle_s), ("partition", args.partition_s)):
                for client in order:
                    topic = f"clients-{mode}-{client}-{rnd}"
                    create_topic(bootstrap, topic)
                    res = run_child(client, mode, bootstrap, topic, amount, args.core) | {"round": rnd}
                    print(json.dumps(res), flush=True)
                    runs.append(res)
    result = {
        "machine": machine_info(),
        "setup": {
            "rounds": args.rounds,
            "trickle": "10 records/s of 20 x 200 B lines",
            "trickle_s": args.trickle_s,
            "partition_s": args.partition_s,
            "record_bytes": RECORD_BYTES,
            "max_inflight_bytes": MAX_INFLIGHT_BYTES,
            "versions": _versions(),
        },
        "runs": runs,
        "rows": summarize(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all("error" not in r for r in runs) else 1


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import confluent_kafka

    return {
        "kafka-python": version("kafka-python"),
        "confluent-kafka": version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, c, m, b, t, a = sys.argv
        print(json.dumps(child(c, m, b, t, float(a))))
        sys.exit(0)
    sys.exit(main())

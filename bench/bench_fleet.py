"""Benchmark the consumer side under a fleet-shaped load: 300 agents, 30 services, one topic.

The other parts load the consumer with a few even modules. The seed's deployment is hundreds
of servers, dozens of modules with very different volumes, lines from 100 B to 50 KB and
bursts. This part produces exactly that through the real record format into the 3-broker
cluster (4 partitions, RF 2, acks=all, lz4), as 300 agents would:

  * 300 hosts, 30 services of 2-5 modules each; every host runs one module, so a module has
    one to several hosts; module volumes follow a Zipf law (a few hot modules, a long tail);
  * line sizes: 80 % 100 B-1 KB, 18 % 1-10 KB, 2 % 10-50 KB (log-uniform in each class);
  * each agent sends one record per 100 ms tick (the agent's read coalescing) holding its
    lines of that tick, up to 900 KB (the agent's max_record_bytes); every second a random
    tenth of the agents bursts at 5x.

Three phases, with one consumer process and with two in one group sharing one data root
(alternating 1 2 2 1 ... over `--rounds`; medians and min-max):

  * average and peak: the seed's 500 GB/day is 5.8 MB/s on average; that, and 10x that
    (58 MB/s), are offered for `--seconds` each. Measured: the rate the generator achieved (on a small machine it is below
    58: the generator, the brokers and the consumers share the cores), the delay from the
    broker's append of a record (LogAppendTime) to the consumer's commit of it (the commit
    follows the day files' fsync; seen by polling the group's committed offsets every
    `--poll-ms`, so each figure is late by up to that) as p50/p99, the same from the record's
    creation (adds the generator's own queue), the consumers' CPU, peak RSS, day files open,
    dedup state size, and the lag left when the generator stops.
  * max: a backlog of `--backlog-mb` is produced with no consumer running, then the
    consumers start (fresh group, fresh root) and drain it: MB/s from their first commit to
    the last (and including their start and group join).

Usage: .venv/bin/python bench/bench_fleet.py --out bench/results/fleet.json [--quick]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from keplerlog.record import Batch
from keplerlog.testing.kafka_node import free_port
from peers.harness import create_topic, delete_topic, kafka_cluster, machine_info, proc_sample

AVERAGE_MB_S = 5.8  # 500 GB/day
PEAK_MB_S = 58.0  # 10 x that
RATES = {"average": AVERAGE_MB_S, "peak": PEAK_MB_S}
TICK_S = 0.1  # the agent's read_coalesce_ms
MAX_RECORD = 900_000  # the agent's max_record_bytes
SIZE_CLASSES = ((0.80, 100, 1_000), (0.18, 1_000, 10_000), (0.02, 10_000, 50_000))
BURST_SHARE, BURST_FACTOR = 0.1, 5.0
PARTITIONS = 4


@dataclass
class Source:
    """One agent's log file: who sends it, and how far it has been shipped."""

    host: str
    service: str
    module: str
    weight: float
    offset: int = 0
    debt: float = 0.0
    cursor: int = 0

    @property
    def path(self) -> str:
        """The file's path on the agent's host."""
        return f"/app/{self.module}/logs/{self.module}.log"


def fleet(rng: random.Random, hosts: int, services: int) -> list[Source]:
    """`hosts` agents over `services` services of 2-5 modules; Zipf-weighted module volumes."""
    modules = [
        (f"svc{s:02d}", f"svc{s:02d}-mod{m}") for s in range(services) for m in range(rng.randint(2, 5))
    ]
    rng.shuffle(modules)
    module_weight = {mod: 1 / (rank + 1) ** 0.9 for rank, mod in enumerate(modules)}
    chosen = [modules[i % len(modules)] for i in range(hosts)]
    per_module = {mod: chosen.count(mod) for mod in modules}
    return [
        Source(f"host-{i:03d}", svc, mod, module_weight[(svc, mod)] / per_module[(svc, mod)])
        for i, (svc, mod) in enumerate(chosen)
    ]


def size_class(pick: float) -> tuple[int, int]:
    """The (smallest, largest) line size of the class a uniform `pick` in [0, 1) falls in."""
    acc = 0.0
    for share, lo, hi in SIZE_CLASSES:
        acc += share
        if pick < acc:
            return lo, hi
    return SIZE_CLASSES[-1][1:]


def line_pool(rng: random.Random, count: int = 4096) -> list[bytes]:
    """Distinct lines with the fleet's size mix (random hex bodies: lz4 gets about 2:1)."""
    pool = []
    for i in range(count):
        lo, hi = size_class(rng.random())
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        head = f"2026-12-04T12:00:{i % 60:02d}.{i % 1000:03d}Z INFO [req {rng.getrandbits(48):012x}] "
        body = rng.randbytes(size).hex()[: max(0, size - len(head) - 1)]
        pool.append((head + body).encode() + b"\n")
    return pool


class Generator:
    """Produces the fleet's records; remembers each record's partition, offset and creation time."""

    def __init__(
        self, bootstrap: str, topic: str, sources: list[Source], pool: list[bytes], seed: int
    ) -> None:
        self.topic = topic
        self.sources = sources
        self.pool = pool
        self.rng = random.Random(seed)
        self.total_weight = sum(s.weight for s in sources)
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            batch_size=1 << 20,
            max_request_size=2 << 20,
            compression_type="lz4",
        )
        # (partition, offset, created ms, appended ms: the broker's clock, LogAppendTime topics)
        self.acked: list[tuple[int, int, int, int]] = []
        self.failed = 0
        self.bytes = 0
        self.records = 0
        self.burst: set[int] = set()

    def _on_ack(self, created_ms: int, md: Any) -> None:
        self.acked.append((md.partition, md.offset, created_ms, md.timestamp))

    def _on_error(self, _exc: BaseException) -> None:
        self.failed += 1

    def tick(self, budget: float) -> int:
        """Send one tick's records worth `budget` bytes over the fleet; return the bytes sent."""
        scale = budget / self.total_weight
        now_ms = int(time.time() * 1000)
        sent = 0
        for i, src in enumerate(self.sources):
            src.debt += src.weight * scale * (BURST_FACTOR if i in self.burst else 1.0)
            lines: list[bytes] = []
            size = 0
            while src.debt > 0:
                line = self.pool[src.cursor % len(self.pool)]
                src.cursor += 7  # coprime with the pool size: every line, in a scrambled order
                lines.append(line)
                size += len(line)
                src.debt -= len(line)
                if size >= MAX_RECORD:
                    sent += self._send(src, lines, now_ms)
                    lines, size = [], 0
            if lines:
                sent += self._send(src, lines, now_ms)
        return sent

    def _send(self, src: Source, lines: list[bytes], now_ms: int) -> int:
        value = b"".join(lines)
        b = Batch(
            src.service, src.module, src.host, src.path, f"{src.host}.1", src.offset, len(lines), now_ms
        )
        fut = self.producer.send(self.topic, value, key=b.key(), headers=b.headers())
        fut.add_callback(lambda md, ms=now_ms: self._on_ack(ms, md))
        fut.add_errback(self._on_error)
        src.offset += len(value)
        self.bytes += len(value)
        self.records += 1
        return len(value)

    def run(self, mb_s: float | None, seconds: float, total: int | None = None) -> dict[str, float]:
        """Send at `mb_s` (None: as fast as possible) for `seconds`, or until `total` bytes."""
        start = time.monotonic()
        first = self.bytes
        next_burst = start
        n = 0
        while True:
            now = time.monotonic()
            if now - start >= seconds or (total is not None and self.bytes - first >= total):
                break
            if now >= next_burst:
                self.burst = set(
                    self.rng.sample(range(len(self.sources)), int(BURST_SHARE * len(self.sources)))
                )
                next_burst = now + 1.0
            budget = (mb_s or 40.0) * 1e6 * TICK_S
            self.tick(budget / (1 + (BURST_FACTOR - 1) * BURST_SHARE))  # bursts keep the mean at mb_s
            n += 1
            if mb_s is not None:
                time.sleep(max(0.0, start + n * TICK_S - time.monotonic()))
        self.producer.flush()
        took = time.monotonic() - start
        return {"seconds": round(took, 2), "mb": round((self.bytes - first) / 1e6, 1),
                "mb_s": round((self.bytes - first) / 1e6 / took, 2)}  # fmt: skip

    def close(self) -> None:
        """Flush and close the producer."""
        self.producer.close()


class Consumers:
    """`count` keplerlog-consumer processes in one group, sharing one data root."""

    def __init__(self, work: Path, bootstrap: str, topic: str, group: str, count: int) -> None:
        self.root = work / "root"
        shutil.rmtree(self.root, ignore_errors=True)
        self.ports = [free_port() for _ in range(count)]
        self.procs = []
        for i, port in enumerate(self.ports):
            cfg = work / f"consumer-{i}.yml"
            kafka = {"bootstrap_servers": bootstrap, "topic": topic, "group_id": group}
            doc = {"kafka": kafka, "root": str(self.root), "metrics": {"port": port, "log_interval_s": 0}}
            cfg.write_text(yaml.safe_dump(doc))
            log = (work / f"consumer-{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "keplerlog.consumer.main", "--config", str(cfg)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        self.cpu0 = [proc_sample(p.pid).cpu_s for p in self.procs]

    def gauge(self, name: str) -> float:
        """The sum of one unlabelled consumer gauge over the processes."""
        total = 0.0
        for port in self.ports:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(f"keplerlog_consumer_{name} "):
                    total += float(line.split()[1])
        return total

    def cpu_s(self) -> float:
        """CPU seconds of all processes since they started (or since `reset_cpu`)."""
        return sum(proc_sample(p.pid).cpu_s for p in self.procs) - sum(self.cpu0)

    def reset_cpu(self) -> None:
        """Count CPU from now on."""
        self.cpu0 = [proc_sample(p.pid).cpu_s for p in self.procs]

    def peak_rss_mb(self) -> float:
        """The largest VmHWM of the processes."""
        return max(proc_sample(p.pid).hwm_mb for p in self.procs)

    def alive(self) -> bool:
        """Tell whether every process still runs."""
        return all(p.poll() is None for p in self.procs)

    def state_bytes(self) -> int:
        """Bytes of the consumers' partition states (the dedup state) in the shared root."""
        state = self.root / ".keplerlog" / "state"
        return sum(p.stat().st_size for p in state.glob("*.json")) if state.exists() else 0

    def stop(self) -> list[int | None]:
        """SIGTERM every process (each finishes its batch); return their exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]


class CommitWatch:
    """Polls a group's committed offsets; when each offset was first seen committed (wall s)."""

    def __init__(self, bootstrap: str, topic: str, group: str, poll_ms: int) -> None:
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        self.topic, self.group, self.poll_s = topic, group, poll_ms / 1000
        self.seen: dict[int, list[tuple[float, int]]] = {p: [] for p in range(PARTITIONS)}
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def committed(self) -> dict[int, int]:
        """The group's committed offset per partition (-1: none yet)."""
        got = self.admin.list_group_offsets(self.group).get(self.group, {})
        return {tp.partition: om.offset for tp, om in got.items() if tp.topic == self.topic}

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.committed()
            except Exception as exc:  # a coordinator move during a rebalance: try again
                self.errors += 1
                if self.errors == 1:
                    print(f"committed offsets of {self.group}: {exc!r} (retrying)", flush=True)
                got = {}
            now = time.time()
            for p, off in got.items():
                if off >= 0 and (not self.seen[p] or off > self.seen[p][-1][1]):
                    self.seen[p].append((now, off))
            self.stop.wait(self.poll_s)

    def first_commit(self) -> float | None:
        """When the first commit of any partition was seen."""
        times = [s[0][0] for s in self.seen.values() if s]
        return min(times) if times else None

    def when_committed(self, partition: int, offset: int) -> float | None:
        """When `offset` of `partition` was first seen committed (committed offset > it)."""
        seen = self.seen[partition]
        i = bisect.bisect_right([off for _, off in seen], offset)
        return seen[i][0] if i < len(seen) else None

    def close(self) -> None:
        """Stop polling."""
        self.stop.set()
        self.thread.join(5)
        self.admin.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The topic's end offset per partition."""
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def wait_drained(watch: CommitWatch, ends: dict[int, int], timeout: float) -> float | None:
    """Wait until every partition is committed up to its end; the wall time of that, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = {p: (s[-1][1] if s else -1) for p, s in watch.seen.items()}
        if all(last.get(p, -1) >= end for p, end in ends.items() if end > 0):
            times = [s[-1][0] for p, s in watch.seen.items() if s and ends.get(p, 0) > 0]
            return max(times) if times else time.time()
        time.sleep(0.05)
    return None


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max in ms."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    v = sorted(values)

    def q(p: float) -> float:
        return round(1000 * v[min(len(v) - 1, int(p * len(v)))], 1)

    return {"p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": round(1000 * v[-1], 1)}


def rate_phase(ctx: dict[str, Any], count: int, tag: str, mb_s: float, seconds: float) -> dict[str, Any]:
    """The consumers running while the generator offers `mb_s` for `seconds`."""
    bootstrap, work = ctx["bootstrap"], ctx["work"]
    topic, group = f"fleet-{tag}", f"fleet-{tag}"
    create_topic(
        bootstrap, topic, PARTITIONS, ctx["replication"], {"message.timestamp.type": "LogAppendTime"}
    )
    gen = Generator(bootstrap, topic, fleet(random.Random(1), ctx["hosts"], ctx["services"]), ctx["pool"], 2)
    consumers = Consumers(work, bootstrap, topic, group, count)
    watch = CommitWatch(bootstrap, topic, group, ctx["poll_ms"])
    try:
        # warm-up: until every partition has a commit (the group formed, each consumer assigned)
        deadline = time.monotonic() + 90
        while sum(1 for s in watch.seen.values() if s) < PARTITIONS:
            if time.monotonic() > deadline or not consumers.alive():
                raise RuntimeError(f"the consumers never committed every partition ({watch.seen})")
            gen.run(mb_s, 1.0)
        time.sleep(2)
        skip = len(gen.acked)
        gen.acked = []
        consumers.reset_cpu()
        files_open: list[float] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(1.0):
                files_open.append(consumers.gauge("open_files"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        offered = gen.run(mb_s, seconds)
        stopped = time.time()
        lag_at_stop = sum(max(0, end - (watch.seen[p][-1][1] if watch.seen[p] else 0))
                          for p, end in end_offsets(bootstrap, topic).items())  # fmt: skip
        drained = wait_drained(watch, end_offsets(bootstrap, topic), 120)
        stop_sampling.set()
        sampler.join(5)
        busy = time.monotonic() - t0
        cpu = consumers.cpu_s()
        committed = [(w, created, appended) for p, off, created, appended in gen.acked
                     if (w := watch.when_committed(p, off)) is not None]  # fmt: skip
        delays = [w - appended / 1000 for w, _, appended in committed]
        from_creation = [w - created / 1000 for w, created, _ in committed]
        result = {
            "consumers": count,
            "offered": offered,
            "records": len(gen.acked),
            "warmup_records": skip,
            "failed_sends": gen.failed,
            "committed_records": len(delays),
            **quantiles(delays),
            "from_creation": quantiles(from_creation),
            "lag_records_at_stop": lag_at_stop,
            "drained_s_after_stop": None if drained is None else round(max(0.0, drained - stopped), 2),
            "consumer_cpu_percent": round(100 * cpu / busy, 1),
            "consumer_peak_rss_mb": round(consumers.peak_rss_mb(), 1),
            "open_day_files_max": max(files_open, default=None),
            "state_bytes": consumers.state_bytes(),
            "sources": len(gen.sources),
            "modules": len({s.module for s in gen.sources}),
        }
    finally:
        watch.close()
        gen.close()
        result_codes = consumers.stop()
        delete_topic(bootstrap, topic)
    result["exit_codes"] = result_codes
    return result


def max_phase(ctx: dict[str, Any], count: int, tag: str, backlog_mb: int) -> dict[str, Any]:
    """A backlog produced with no consumer running, then drained by `count` consumers."""
    bootstrap, work = ctx["bootstrap"], ctx["work"]
    topic, group = f"fleet-max-{tag}", f"fleet-max-{tag}"
    create_topic(bootstrap, topic, PARTITIONS, ctx["replication"])
    gen = Generator(bootstrap, topic, fleet(random.Random(1), ctx["hosts"], ctx["services"]), ctx["pool"], 3)
    try:
        produced = gen.run(None, 3600, total=backlog_mb * 1_000_000)
    finally:
        gen.close()
    ends = end_offsets(bootstrap, topic)
    watch = CommitWatch(bootstrap, topic, group, ctx["poll_ms"])
    started = time.time()
    consumers = Consumers(work, bootstrap, topic, group, count)
    try:
        done = wait_drained(watch, ends, 900)
        cpu = consumers.cpu_s()
        first = watch.first_commit()
        rss = consumers.peak_rss_mb()
        state = consumers.state_bytes()
    finally:
        watch.close()
        codes = consumers.stop()
        delete_topic(bootstrap, topic)
    mb = produced["mb"]
    return {
        "consumers": count,
        "backlog_mb": mb,
        "producer_mb_s": produced["mb_s"],
        "drained": done is not None,
        "mb_s": round(mb / (done - first), 1) if done and first and done > first else None,
        "mb_s_incl_startup": round(mb / (done - started), 1) if done else None,
        "consumer_cpu_s": round(cpu, 1),
        "consumer_peak_rss_mb": round(rss, 1),
        "state_bytes": state,
        "exit_codes": codes,
    }


def summary(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median and min-max of `key` over rows (None values left out)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"median": None, "spread": None, "runs": []}
    return {"median": statistics.median(values), "spread": [min(values), max(values)], "runs": values}


PEAK_KEYS = ("p50_ms", "p99_ms", "consumer_cpu_percent", "consumer_peak_rss_mb", "open_day_files_max",
             "state_bytes", "lag_records_at_stop", "drained_s_after_stop")  # fmt: skip
MAX_KEYS = ("mb_s", "mb_s_incl_startup", "consumer_peak_rss_mb", "state_bytes")


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, write the JSON; exit 1 if a run lost its consumers or never drained."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--rounds", type=int, default=2, help="each round runs 1 and 2 consumers (order alternates)"
    )
    ap.add_argument("--seconds", type=float, default=45.0, help="length of the peak phase")
    ap.add_argument("--backlog-mb", type=int, default=1500)
    ap.add_argument("--hosts", type=int, default=300)
    ap.add_argument("--services", type=int, default=30)
    ap.add_argument("--poll-ms", type=int, default=20)
    ap.add_argument("--brokers", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round, 10 s peak, 200 MB backlog")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.backlog_mb = 1, 10.0, 200
    work = Path(tempfile.mkdtemp(prefix="kl-fleet-"))
    phases = [*RATES, "max"]
    rows: dict[int, dict[str, list[dict[str, Any]]]] = {n: {ph: [] for ph in phases} for n in (1, 2)}
    try:
        with kafka_cluster(work / "kafka", size=args.brokers) as cluster:
            ctx = {
                "bootstrap": cluster.bootstrap,  # type: ignore[attr-defined]
                "work": work,
                "replication": min(2, args.brokers),
                "pool": line_pool(random.Random(7)),
                "hosts": args.hosts,
                "services": args.services,
                "poll_ms": args.poll_ms,
            }
            for r in range(args.rounds):
                for count in (1, 2) if r % 2 == 0 else (2, 1):
                    tag = f"{r}-{count}"
                    for name, mb_s in RATES.items():
                        print(f"round {r + 1}: {count} consumer(s), {name} {mb_s} MB/s for {args.seconds:.0f} s",
                              flush=True)  # fmt: skip
                        run = rate_phase(ctx, count, f"{tag}-{name}", mb_s, args.seconds)
                        print(json.dumps({k: run.get(k) for k in ("offered", *PEAK_KEYS)}), flush=True)
                        rows[count][name].append(run)
                    print(f"round {r + 1}: {count} consumer(s), drain {args.backlog_mb} MB", flush=True)
                    mx = max_phase(ctx, count, tag, args.backlog_mb)
                    print(json.dumps({k: mx.get(k) for k in ("producer_mb_s", *MAX_KEYS)}), flush=True)
                    rows[count]["max"].append(mx)
                    shutil.rmtree(work / "root", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pool = line_pool(random.Random(7))
    sources = fleet(random.Random(1), args.hosts, args.services)
    result: dict[str, Any] = {
        "params": vars(args) | {"out": str(args.out), "rates_mb_s": RATES},
        "fleet": {
            "hosts": len(sources),
            "services": len({s.service for s in sources}),
            "modules": len({s.module for s in sources}),
            "mean_line_bytes": round(sum(map(len, pool)) / len(pool)),
            "line_bytes_p50_p99_max": [
                sorted(map(len, pool))[int(q * (len(pool) - 1))] for q in (0.5, 0.99, 1.0)
            ],
        },
        "command": ".venv/bin/python bench/bench_fleet.py --out bench/results/fleet.json"
        + (" --quick" if args.quick else ""),
        "machine": machine_info(),
    }
    for count, by_phase in rows.items():
        result[f"consumers_{count}"] = {
            name: {k: summary(by_phase[name], k) for k in PEAK_KEYS}
            | {"offered_mb_s": summary([p["offered"] for p in by_phase[name]], "mb_s")}
            for name in RATES
        } | {"max": {k: summary(by_phase["max"], k) for k in MAX_KEYS}, "runs": by_phase}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    bad = [
        r for by_phase in rows.values() for runs in by_phase.values() for r in runs
        if any(c not in (0, None) for c in r["exit_codes"]) or r.get("drained") is False
        or r.get("drained_s_after_stop", 0) is None
    ]  # fmt: skip
    for count in (1, 2):
        c = result[f"consumers_{count}"]
        print(
            f"{count} consumer(s): peak p50 {c['peak']['p50_ms']['median']} ms, p99 {c['peak']['p99_ms']['median']} ms, "
            f"CPU {c['peak']['consumer_cpu_percent']['median']} %; max {c['max']['mb_s']['median']} MB/s"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

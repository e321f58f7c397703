"""Consumer throughput: Kafka -> day files (MB/s), against kcat to a file and dd.

Starts its own single-node KRaft Kafka (dist/kafka), preloads N MB of kepler-log records
(1 KB lines, ~64 KB records, several modules), then times:
  * one `keplerlog-consumer` process writing day files with fsync (first byte -> last byte and
    process start -> last byte);
  * `kcat -C -e -o beginning > file` on the same topic (the "raw read" ceiling);
  * `dd if=/dev/zero bs=1M conv=fdatasync` (the disk's sequential write speed).
Usage: .venv/bin/python bench/bench_consumer.py --out bench/results/consumer.json [--mb 1024]
       [--runs 3]  (consumer and kcat alternate; the median of each is reported, so that a busy
                   machine hits both alike)
       [--profile] (one more consumer run under py-spy, every thread sampled: the share of
                   CPU samples per stage, so the gap to kcat is explained by a profile)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kafka import KafkaProducer
from keplerlog.record import Batch
from keplerlog.testing.kafka_node import KafkaCluster

REPO = Path(__file__).resolve().parents[1]


def make_pool(count: int, record_bytes: int, line_bytes: int, rng: random.Random) -> list[bytes]:
    """Distinct record values of whole lines (some random, some repetitive, like real logs)."""
    pool = []
    lines_per_record = max(1, record_bytes // line_bytes)
    for r in range(count):
        lines = []
        for i in range(lines_per_record):
            head = (
                f"2024-03-01T12:00:{i % 60:02d}.123Z INFO [worker-{r}] request id={rng.getrandbits(64):016x} "
            )
            body = rng.randbytes((line_bytes - len(head) - 1) // 2).hex()
            lines.append((head + body)[: line_bytes - 1].encode() + b"\n")
        pool.append(b"".join(lines))
    return pool


def preload(
    bootstrap: str,
    topic: str,
    total: int,
    pool: list[bytes],
    modules: int,
    compression: str,
) -> dict:
    """Produce `total` bytes of records round-robin over `modules` source files."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        batch_size=1 << 20,
        max_request_size=4 << 20,
        compression_type=None if compression == "none" else compression,
    )
    offsets = [0] * modules
    sent = records = 0
    ts = int(time.time() * 1000)
    start = time.monotonic()
    while sent < total:
        m = records % modules
        value = pool[records % len(pool)]
        b = Batch(
            "bench",
            f"mod{m}",
            "h1",
            f"/app/mod{m}.log",
            f"id{m}",
            offsets[m],
            value.count(b"\n"),
            ts,
        )
        producer.send(topic, value, key=b.key(), headers=b.headers())
        offsets[m] += len(value)
        sent += len(value)
        records += 1
    producer.flush()
    producer.close()
    return {"bytes": sent, "records": records, "seconds": time.monotonic() - start}


def data_bytes(root: Path) -> int:
    """Return the bytes in day files (state dir excluded)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".keplerlog"]
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in filenames)
    return total


# The consumer as `keplerlog.consumer.main`, but with netfix.py's changes made no-ops first.
WITHOUT_NETFIX = (
    "import sys\n"
    "from keplerlog.consumer import netfix\n"
    "netfix.apply = netfix.favor_io_thread = lambda *a, **k: None\n"
    "from keplerlog.consumer.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


# Where a CPU sample of the consumer goes, by the frames of its stack: the first rule (in this
# order) any frame matches. py-spy names a frame "function (file.py:line)".
STAGES = (
    ("fsync (day files, state)", ("fsync", "fdatasync")),
    ("lz4 decompression", ("lz4", "_maybe_uncompress")),
    ("kafka-python: record parsing", ("default_records", "memory_records", "legacy_records", "record/")),
    (
        "kafka-python: fetch, sockets, protocol",
        ("kafka/", "conn.py", "selectors.py", "netfix", "fetcher", "socket"),
    ),
    ("writes to day files", ("files.py", "os.write", "writev")),
    ("librdkafka client: consume, message objects", ("rdclient.py",)),
    (
        "routing, dedup, whole lines, state",
        ("keplerlog/", "sink.py", "route.py", "spans.py", "lines.py", "journal.py"),
    ),
)


# Leaf frames of a thread that waits (a pool worker on its queue, a lock, a blocking select):
# py-spy does not always see such a thread as idle; these samples are not CPU and are left out.
WAITING = ("concurrent/futures/thread.py:8", "threading.py", "queue.py", "EpollSelector.select")


def stage_of(frames: list[str]) -> str:
    """The stage a stack belongs to (leaf-first rules of STAGES), or 'other'."""
    for name, needles in STAGES:
        if any(n in f for f in frames for n in needles):
            return name
    return "other (interpreter, logging, metrics)"


def summarize_profile(raw: Path) -> dict:
    """Shares of CPU samples per stage and per thread, and the top leaf functions."""
    stages: dict[str, int] = {}
    threads: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any(w in frames[-1] for w in WAITING):
            waiting += n
            continue
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        total += n
        stages[stage_of(frames[1:])] = stages.get(stage_of(frames[1:]), 0) + n
        threads[thread] = threads.get(thread, 0) + n
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + n

    def shares(counts: dict[str, int], top: int | None = None) -> list[list]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[k, round(100 * v / total, 1)] for k, v in ranked]

    return {
        "samples": total,
        "waiting_samples_left_out": waiting,
        "stages": shares(stages),
        "threads": shares(threads, 6),
        "top_functions": shares(leaves, 12),
    }


def run_consumer(
    bootstrap: str,
    topic: str,
    work: Path,
    expected: int,
    timeout: float,
    group: str = "bench",
    security: dict[str, str] | None = None,
    netfix: bool = True,
    attach: list[str] | None = None,
    processes: int = 1,
    client: str = "kafka-python",
    brokers: list[int] | None = None,
    extra: dict | None = None,
) -> dict:
    """Time consumer processes (a fresh group, a fresh root) until all bytes are on disk.

    `security`: a kafka.security section (bench_security.py: the same broker over SASL_SSL).
    `netfix` False: the consumer with kafka-python's own socket reads and the interpreter's
    default switch interval (consumer/netfix.py's two changes undone), for the A/B.
    `attach`: a profiler command, given `--pid <consumer>`, started with the consumer and
    stopped with SIGINT (so it writes its file) before the consumer is (one process only).
    `processes` > 1: that many consumer processes in the one group, sharing the one root (as
    several consumer hosts may, README): the partitions are split between them, and each runs
    its own interpreter, so a host's second core works too.
    `client`: the consumer's kafka.client (kafka-python or librdkafka, consumer/rdclient.py).
    `brokers`: the brokers' process groups, whose CPU is counted with the consumer's.
    `extra`: more top-level keys of consumer.yml (an A/B of a setting).
    """
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    cfg = work / "consumer.yml"
    kafka = {"bootstrap_servers": bootstrap, "topic": topic, "group_id": group, "client": client}
    if security:
        kafka["security"] = security
    cfg.write_text(
        yaml.safe_dump(
            {
                "kafka": kafka,
                "root": str(root),
                "metrics": {"port": 0, "log_interval_s": 5},
                **(extra or {}),
            }
        )
    )
    log = (work / "consumer.log").open("wb")
    start = time.monotonic()
    profile = []  # KL_BENCH_PROFILE=1: cProfile the consumer into workdir/consumer.prof
    if os.environ.get("KL_BENCH_PROFILE"):
        profile = ["-m", "cProfile", "-o", str(work / "consumer.prof")]
    entry = ["-m", "keplerlog.consumer.main"] if netfix else ["-c", WITHOUT_NETFIX]
    procs = [
        subprocess.Popen(
            [sys.executable, *(profile if n == 0 else []), *entry, "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for n in range(processes)
    ]
    spy = (
        subprocess.Popen([*attach, "--pid", str(procs[0].pid)], stdout=log, stderr=subprocess.STDOUT)
        if attach
        else None
    )
    first = None
    cpu_first: dict[str, float] = {}
    cpu_done: dict[str, float] = {}
    peak_rss = 0.0
    try:
        while time.monotonic() - start < timeout:
            size = data_bytes(root) if root.exists() else 0
            if size and first is None:
                first = time.monotonic()
                cpu_first = _cpu(procs, brokers)
            if size >= expected:
                break
            time.sleep(0.05)
        done = time.monotonic()
        cpu_done = _cpu(procs, brokers)
        peak_rss = max(_peak_rss_mb(proc.pid) for proc in procs)
        size = data_bytes(root)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    first = first or done
    return {
        # CPU seconds per GB written, from the first data byte on: the consumer's threads by
        # kind (thread_cpu) and the broker's JVMs, which share the host's cores with it
        "cpu_s_per_gb": _cpu_per_gb(cpu_first, cpu_done, size) if size and cpu_first else {},
        "peak_rss_mb": round(peak_rss, 1),
        "bytes": size,
        "complete": size == expected,
        "exit_code": max((proc.returncode for proc in procs), key=abs),
        "processes": processes,
        "seconds_total": done - start,
        "seconds_data": done - first,
        "mb_s": size / (done - first) / 1e6 if done > first else 0.0,
        "mb_s_incl_startup": size / (done - start) / 1e6,
    }


TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a live process, from /proc.

    librdkafka names its threads `rdk:main`, `rdk:broker...`; the interpreter's threads keep
    the process's name: the split says how much of the consumer's CPU is the C client's.
    """
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        group = "librdkafka" if name.startswith("rdk:") else "interpreter"
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process of a process group (a broker's script and its JVM)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def _cpu_per_gb(before: dict[str, float], after: dict[str, float], size: int) -> dict[str, float]:
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / (size / 1e9), 2) for k in after}


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def _cpu(procs: list[subprocess.Popen], brokers: list[int] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for proc in procs:
        for group, seconds in thread_cpu(proc.pid).items():
            out[group] = out.get(group, 0.0) + seconds
    out["broker"] = sum(group_cpu(pgid) for pgid in brokers or [])
    return out


def run_kcat(bootstrap: str, topic: str, work: Path, brokers: list[int] | None = None) -> dict:
    """Time kcat reading the whole topic into one file; its and the brokers' CPU per GB."""
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if not kcat:
        return {"missing": True}
    out = work / "kcat.out"
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    broker_before = sum(group_cpu(pgid) for pgid in brokers or [])
    with out.open("wb") as f:
        subprocess.run(
            [kcat, "-C", "-b", bootstrap, "-t", topic, "-e", "-o", "beginning", "-q"],
            stdout=f,
            check=True,
        )
        os.fsync(f.fileno())
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    broker = sum(group_cpu(pgid) for pgid in brokers or []) - broker_before
    size = out.stat().st_size
    out.unlink()
    kcat_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "bytes": size,
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "cpu_s_per_gb": {
            "kcat": round(kcat_cpu / (size / 1e9), 2),
            "broker": round(broker / (size / 1e9), 2),
        },
    }


def run_dd(work: Path, mb: int) -> dict:
    """Time a sequential write with fdatasync at the end."""
    target = work / "dd.out"
    start = time.monotonic()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={target}",
            "bs=1M",
            f"count={mb}",
            "conv=fdatasync",
        ],
        check=True,
        capture_output=True,
    )
    seconds = time.monotonic() - start
    target.unlink()
    return {"bytes": mb << 20, "seconds": seconds, "mb_s": (mb << 20) / seconds / 1e6}


def _median(runs: list[dict]) -> dict:
    """The run with the median MB/s (the slower middle one for an even count)."""
    if any(r.get("missing") for r in runs):
        return runs[0]
    ordered = sorted(runs, key=lambda r: r["mb_s"])
    median = statistics.median_low([r["mb_s"] for r in ordered])
    return next(r for r in ordered if r["mb_s"] == median) | {
        "complete": all(r.get("complete", True) for r in runs)
    }


def profile_run(bootstrap: str, topic: str, work: Path, expected: int, client: str = "kafka-python") -> dict:
    """One consumer run under py-spy (all threads, CPU samples only); its MB/s and stage shares.

    py-spy sees the interpreter's threads: librdkafka's own (fetch, decompression) are not in
    it, their CPU is in the runs' `cpu_s_per_gb` instead.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"missing": "py-spy (scripts/bench-deps.sh installs it into .venv)"}
    raw = work / "consumer.pyspy.txt"
    attach = [spy, "record", "--format", "raw", "--output", str(raw), "--rate", "200", "--threads"]
    run = run_consumer(
        bootstrap, topic, work, expected, 600, f"bench-profile-{client}", attach=attach, client=client
    )
    shutil.rmtree(work / "root", ignore_errors=True)
    if not raw.exists():
        return {"missing": "py-spy wrote no profile", "mb_s": run["mb_s"]}
    return {"mb_s": round(run["mb_s"], 1), "rate_hz": 200} | summarize_profile(raw)


def main() -> int:
    """Run the benchmark, print a table, write JSON; exit 1 if the consumer did not finish."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "consumer.json"))
    parser.add_argument("--mb", type=int, default=1024, help="data to preload (MB)")
    parser.add_argument("--record-kb", type=int, default=64)
    parser.add_argument("--line-bytes", type=int, default=1024)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--compression", default="lz4", choices=("none", "lz4", "zstd", "gzip"))
    parser.add_argument("--workdir", help="scratch dir (default: a temp dir, removed afterwards)")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="consumer and kcat runs, alternating; medians are reported",
    )
    parser.add_argument("--profile", action="store_true", help="one more consumer run under py-spy")
    parser.add_argument(
        "--netfix-ab",
        action="store_true",
        help="also run the consumer without consumer/netfix.py in every round (A/B)",
    )
    parser.add_argument(
        "--librdkafka",
        action="store_true",
        help="also run the consumer with kafka.client librdkafka in every round",
    )
    parser.add_argument(
        "--two-processes",
        action="store_true",
        help="also run two consumer processes in one group sharing the root, in every round",
    )
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = KafkaCluster(work / "kafka", size=1)
    result: dict = {"params": vars(args) | {"cpus": os.cpu_count()}}
    try:
        cluster.start()
        topic = "bench"
        cluster.create_topic(topic, partitions=args.partitions, replication=1)
        pool = make_pool(32, args.record_kb * 1024, args.line_bytes, random.Random(1))
        result["preload"] = preload(
            cluster.bootstrap,
            topic,
            args.mb * 1_000_000,
            pool,
            args.modules,
            args.compression,
        )
        expected = result["preload"]["bytes"]
        brokers = [node.process.pid for node in cluster.nodes if node.process is not None]
        # Every member runs once per round, the order reversed every round: A B C, C B A, ...
        members = ["consumer"]
        if args.netfix_ab:
            members.append("consumer_without_netfix")
        if args.librdkafka:
            members.append("consumer_librdkafka")
        if args.two_processes:
            members.append("consumer_two_processes")
        members.append("kcat")
        runs: dict[str, list[dict]] = {m: [] for m in members}
        for i in range(args.runs):
            for member in members if i % 2 == 0 else members[::-1]:
                if member == "kcat":
                    runs[member].append(run_kcat(cluster.bootstrap, topic, work, brokers))
                    continue
                runs[member].append(
                    run_consumer(
                        cluster.bootstrap,
                        topic,
                        work,
                        expected,
                        600,
                        f"bench-{i}-{member}",
                        netfix=member != "consumer_without_netfix",
                        processes=2 if member == "consumer_two_processes" else 1,
                        client="librdkafka" if member == "consumer_librdkafka" else "kafka-python",
                        brokers=brokers,
                    )
                )
                shutil.rmtree(work / "root", ignore_errors=True)
        for member, member_runs in runs.items():
            result[member] = _median(member_runs)
        if args.runs > 1:
            result["runs"] = {
                f"{m}_mb_s": [round(r.get("mb_s", 0.0), 1) for r in rs] for m, rs in runs.items()
            }
        result["dd"] = run_dd(work, min(args.mb, 1024))
        if args.profile:
            result["profile"] = profile_run(cluster.bootstrap, topic, work, expected)
            if args.librdkafka:
                result["profile_librdkafka"] = profile_run(
                    cluster.bootstrap, topic, work, expected, client="librdkafka"
                )
    finally:
        cluster.destroy()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    c, k, d = result["consumer"], result["kcat"], result["dd"]
    result["targets"] = {
        "consumer_ge_100_mb_s": c["mb_s"] >= 100,
        "ge_0_8x_kcat": None if k.get("missing") else c["mb_s"] >= 0.8 * k["mb_s"],
    }
    rows = [
        (
            "preload (kafka-python producer)",
            result["preload"]["bytes"],
            result["preload"]["seconds"],
        ),
        ("keplerlog-consumer (first->last byte)", c["bytes"], c["seconds_data"]),
        ("keplerlog-consumer (incl. start/join)", c["bytes"], c["seconds_total"]),
    ]
    if not k.get("missing"):
        rows.append(("kcat -C -e > file", k["bytes"], k["seconds"]))
    rows.append(("dd conv=fdatasync", d["bytes"], d["seconds"]))
    print(f"{'step':40} {'MB':>9} {'s':>8} {'MB/s':>8}")
    for name, size, seconds in rows:
        print(f"{name:40} {size / 1e6:9.1f} {seconds:8.2f} {size / 1e6 / max(seconds, 1e-9):8.1f}")
    if k.get("missing"):
        print("kcat: not installed")
    print(f"complete={c['complete']} exit={c['exit_code']} targets={result['targets']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result[m]["complete"] for m in runs if m != "kcat") else 1


if __name__ == "__main__":
    sys.exit(main())

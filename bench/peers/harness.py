"""Shared machinery of the benchmarks: workload files, the Kafka cluster, counting, processes.

Every tool is measured the same way so that the table compares tools, not harnesses: the
same file, the same cluster and topic settings, the same pinned core, the same clock. The
scripts run as `python bench/<name>.py`, so `bench/` is on sys.path and this imports as
`peers.harness`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent
# Gitignored scratch space (Kafka data, peer state, workload files).
WORK_DIR = BENCH_DIR / "work"
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = resource.getpagesize() // 1024

_WORDS = (
    "GET",
    "POST",
    "PUT",
    "user",
    "order",
    "cart",
    "item",
    "checkout",
    "session",
    "token",
    "cache",
    "miss",
    "hit",
    "db",
    "query",
    "timeout",
    "retry",
    "upstream",
    "status=200",
    "status=404",
    "status=500",
    "latency_ms",
    "bytes",
    "id",
    "region",
    "eu-west",
    "shard",
    "replica",
    "worker",
    "thread",
    "pool",
    "queue",
    "depth",
    "payload",
    "json",
    "ok",
    "warn",
)
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def deployed_client() -> str:
    """The agent's Kafka client as the service image runs it (the role's default, defined once).

    The image (roles/service_image) may pick another client than the agent package's own
    default (kafka-python): "the agent at defaults" in a benchmark is the one operators run.
    """
    defaults = yaml.safe_load((REPO_ROOT / "roles/service_image/defaults/main.yml").read_text())
    return str(defaults["service_image_agent_kafka_client"])


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind the stack like Ctrl-C, so `finally` blocks stop tools and Kafka.

    run.py stops a part that overran its time limit with SIGTERM; Python's default would
    end the process at once and leave the brokers (in sessions of their own) running.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def machine_info() -> dict[str, object]:
    """Describe the machine, so figures from different hosts are not compared blindly."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def make_line(seq: int, size: int, rng: random.Random) -> bytes:
    """One log line of exactly `size` bytes (newline included) that looks like an app log.

    Varied words keep lz4 from compressing the workload to nothing, which would flatter
    every tool equally and hide the per-line costs the benchmark is about.
    """
    head = (
        f"2026-01-01T12:{seq // 60000 % 60:02d}:{seq // 1000 % 60:02d}.{seq % 1000:03d}Z "
        f"{rng.choice(_LEVELS):5s} [worker-{seq % 16}] seq={seq:09d} "
    )
    body: list[str] = []
    length = len(head)
    while length < size - 1:
        word = rng.choice(_WORDS)
        body.append(word)
        length += len(word) + 1
    text = (head + " ".join(body))[: size - 1]
    return text.ljust(size - 1).encode() + b"\n"


def write_workload(path: Path, lines: int, size: int, seed: int = 7) -> int:
    """Write `lines` lines of `size` bytes to `path`; reuse an identical file if present.

    Returns the byte size. Generation is chunked so a 200 MB file never sits in memory.
    """
    expected = lines * size
    if path.exists() and path.stat().st_size == expected:
        return expected
    rng = random.Random(seed)
    # Distinct tails are costly to generate: cycle through a pool and vary the head only.
    pool = [make_line(i, size, rng) for i in range(min(lines, 4096))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        chunk: list[bytes] = []
        for seq in range(lines):
            # A unique 10-byte prefix per line; the rest comes from the pool.
            chunk.append(b"%09d " % (seq % 1_000_000_000) + pool[seq % len(pool)][10:])
            if len(chunk) == 8192:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))
    tmp.rename(path)
    return expected


@contextmanager
def kafka_cluster(workdir: Path, size: int = 3, settings: tuple[str, ...] = ()) -> Iterator[object]:
    """Start a real local KRaft cluster for the benchmark and always destroy it afterwards.

    `settings`: more server.properties lines for every node.
    """
    from keplerlog.testing.kafka_node import KafkaCluster

    shutil.rmtree(workdir, ignore_errors=True)
    cluster = KafkaCluster(workdir, size=size, settings=settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def dirty_mb() -> float:
    """Page cache not yet on disk (Dirty + Writeback in /proc/meminfo), MB."""
    kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(("Dirty:", "Writeback:")):
                kb += int(line.split()[1])
    return kb / 1024


def settle_writeback(limit_mb: float = 256, timeout: float = 120) -> float:
    """Flush the page cache and wait until less than `limit_mb` is left to write; return seconds.

    A run that starts while gigabytes written before it (the workload files, the previous run's
    topic) go to disk would compete with that writeback for the disk and the cores, and the
    tool that runs after a large one would pay for it. Each run starts settled.
    """
    started = time.monotonic()
    os.sync()
    while dirty_mb() > limit_mb and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return round(time.monotonic() - started, 2)


def read_into_cache(path: Path, chunk: int = 1 << 20) -> float:
    """Read `path` once so that the page cache holds it; return the seconds it took.

    A tool that reads its workload from the disk measures the disk, and the three workloads
    (15 GB) and each run's topic data (gigabytes) do not all stay cached on a 24 GB machine:
    which tool found its file cached would depend on the order. Every run starts with it cached.
    """
    started = time.monotonic()
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return round(time.monotonic() - started, 2)


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 4,
    replication: int = 2,
    configs: dict[str, str] | None = None,
) -> None:
    """Create a topic (`configs`: topic settings) and wait until every partition has a leader."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, replication, topic_configs=configs or {})])
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(name) or set()
            if len(parts) == partitions:
                return
            time.sleep(0.2)
            consumer.topics()  # refresh metadata
        raise TimeoutError(f"topic {name} has no leaders after 30 s")
    finally:
        consumer.close()


def delete_topic(bootstrap: str, name: str) -> None:
    """Delete a run's topic (best effort: a failure only costs disk until the cluster goes)."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.delete_topics([name])
        finally:
            admin.close()
    except Exception as exc:
        print(f"could not delete topic {name}: {exc}", flush=True)


def header_lines_below(bootstrap: str, ends: dict[Any, int], timeout: float = 120) -> int:
    """The lines (`kl.lines` headers, 1 for a record without one) of every record below `ends`
    (partition -> offset), read from the start of each partition."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        todo = [tp for tp, end in ends.items() if end > 0]
        consumer.assign(todo)
        consumer.seek_to_beginning(*todo)
        lines = 0
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read the topic up to {ends} within {timeout:.0f} s")
            for tp, records in consumer.poll(timeout_ms=200, max_records=100_000).items():
                for rec in records:
                    if rec.offset < ends[tp]:
                        lines += next((int(v) for k, v in rec.headers or () if k == "kl.lines"), 1)
            todo = [tp for tp in todo if consumer.position(tp) < ends[tp]]
            consumer.pause(*[tp for tp in consumer.assignment() if tp not in todo])
        return lines
    finally:
        consumer.close()


class TopicCounter:
    """Count lines that reached a topic.

    One line per record (kcat, rsyslog, Flume): the sum of the partitions' end offsets, which
    costs one cheap request per poll. The kepler-log agent packs many lines into a record, so
    with `headers=True` the records are consumed and their `kl.lines` headers summed.
    """

    def __init__(self, bootstrap: str, topic: str, headers: bool = False) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self.headers = headers
        self.lines = 0
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        parts = self.consumer.partitions_for_topic(topic) or set()
        self.partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        if headers:
            self.consumer.assign(self.partitions)
            self.consumer.seek_to_beginning(*self.partitions)

    def count(self) -> int:
        """Return the number of lines in the topic so far."""
        if not self.headers:
            ends = self.consumer.end_offsets(self.partitions)
            self.lines = sum(ends.values())
            return self.lines
        batches = self.consumer.poll(timeout_ms=50, max_records=100000)
        for records in batches.values():
            for rec in records:
                lines = 1
                for name, value in rec.headers or ():
                    if name == "kl.lines":
                        lines = int(value)
                self.lines += lines
        return self.lines

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


def wait_count(
    counter: TopicCounter,
    target: int,
    timeout: float,
    alive: Callable[[], str] | None = None,
    start: int = 0,
) -> tuple[float, float]:
    """Poll until `target` lines are in the topic.

    Returns the monotonic times at which the count first exceeded `start` (the tool picked
    the file up) and reached `target`. `alive` returns an error string once the tool died,
    so a crashed tool fails at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    first = 0.0
    while True:
        now = time.monotonic()
        count = counter.count()
        if count > start and not first:
            first = now
        if count >= target:
            return first or now, now
        if alive is not None and (err := alive()):
            raise RuntimeError(f"{err} ({count - start}/{target - start} lines in Kafka)")
        if now > deadline:
            raise TimeoutError(
                f"timeout after {timeout:.0f} s: {count - start}/{target - start} lines in Kafka"
            )
        time.sleep(0.05)


@dataclass
class CpuMem:
    """CPU seconds (user + sys) and peak RSS of one process, read from /proc."""

    user_s: float = 0.0
    sys_s: float = 0.0
    hwm_mb: float = 0.0

    @property
    def cpu_s(self) -> float:
        """User plus system time."""
        return self.user_s + self.sys_s


def proc_sample(pid: int) -> CpuMem:
    """Read a process's CPU times (all threads) and VmHWM; zeros once it is gone."""
    sample = CpuMem()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        sample.user_s = int(fields[11]) / CLK_TCK
        sample.sys_s = int(fields[12]) / CLK_TCK
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                sample.hwm_mb = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return sample


_THREAD_NUMBER = re.compile(r"(?<=[A-Za-z])[-_:#]?\d+$")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + sys) per thread name of a running process, from /proc/PID/task.

    Numbered threads form one group (librdkafka's rdk:broker1 .. rdk:broker3 are `rdk:broker`):
    the split between the interpreter's threads and the Kafka client's shows where a tool's
    CPU goes without a profiler. Threads gone before the read are missing (not counted).
    """
    groups: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return groups
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        group = _THREAD_NUMBER.sub("", name) or name
        groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return groups


def cpu_by_thread(
    before: dict[str, float], after: dict[str, float], seconds: float, top: int = 4
) -> dict[str, float]:
    """% of a core per thread group between two `thread_cpu` reads; the rest summed as `other`."""
    used = {name: 100 * (cpu - before.get(name, 0.0)) / seconds for name, cpu in after.items()}
    ranked = sorted(used.items(), key=lambda kv: -kv[1])
    out = {name: round(pct, 1) for name, pct in ranked[:top]}
    rest = sum(pct for _, pct in ranked[top:])
    if rest >= 0.05:
        out["other"] = round(rest, 1)
    return out


@dataclass
class Tool:
    """A tool under test running as a child pinned to one core; measured from /proc and wait4.

    The command is exec'd by `taskset`, so the child's pid is the tool's own pid and its
    rusage covers all of its threads.
    """

    cmd: Sequence[str]
    log: Path
    cpu: int | None = 1
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    rusage: resource.struct_rusage | None = field(default=None, repr=False)
    returncode: int | None = None
    started: float = 0.0
    last: CpuMem = field(default_factory=CpuMem)

    def start(self) -> None:
        """Launch the tool in its own process group (so stray children can be killed too)."""
        cmd = list(self.cmd)
        if self.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        self.started = time.monotonic()

    def sample(self) -> CpuMem:
        """Current CPU times and peak RSS (kept as the last good sample)."""
        assert self.proc is not None
        got = proc_sample(self.proc.pid)
        if got.cpu_s or got.hwm_mb:
            self.last = got
        return self.last

    def reap(self) -> bool:
        """Reap the tool if it has exited (wait4 keeps its rusage; Popen.poll would lose it)."""
        assert self.proc is not None
        if self.returncode is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = self.proc.returncode if self.proc.returncode is not None else -1
            return True
        if pid:
            self._reaped(status, usage)
            return True
        return False

    def dead(self) -> str:
        """An error string if the tool has exited, else ''."""
        if self.reap():
            return f"exited with code {self.returncode}: {self.tail()}"
        return ""

    def tail(self, chars: int = 400) -> str:
        """The end of the tool's log, for failure reasons."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text[-chars:].split())

    def wait(self, timeout: float) -> int:
        """Wait for a tool that ends by itself (kcat), collecting its rusage."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample()
            if self.reap():
                return self.returncode or 0
            time.sleep(0.02)
        raise TimeoutError(f"did not exit within {timeout:.0f} s")

    def _reaped(self, status: int, usage: resource.struct_rusage) -> None:
        assert self.proc is not None
        self.rusage = usage
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode

    def stop(self, grace: float = 15) -> None:
        """SIGTERM the tool's group, SIGKILL after `grace`, and reap it (wait4 rusage)."""
        if self.proc is None or self.returncode is not None:
            return
        self.sample()
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self.reap():
                    return
                time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        """Peak RSS: the last VmHWM seen, else ru_maxrss of the reaped child.

        VmHWM is preferred: ru_maxrss of a forked child also counts the harness's own memory
        from before the exec (about 40 MB of Python), which would bury small tools like kcat.
        """
        if self.last.hwm_mb:
            return self.last.hwm_mb
        if self.rusage is not None:
            return self.rusage.ru_maxrss / 1024
        return 0.0

    def total_cpu_s(self) -> float:
        """All CPU the tool used over its life (start-up included)."""
        if self.rusage is not None:
            return self.rusage.ru_utime + self.rusage.ru_stime
        return self.last.cpu_s

"""Benchmark the kepler-log agent against a real three-node Kafka (RF 2, 4 partitions, acks=all).

Measures, with the agent pinned to one core:
  * throughput: lines/s shipping a pre-written file of N 200-byte lines until every line is acked
    (timed from the moment the whole file appears, linked in while the agent waits, to the last ack);
  * peak RSS (VmHWM) of the agent process during that run;
  * CPU% of one core while following a file written at a steady 200 lines/s;
  * end-to-end latency at 10,000 lines/s: each line carries its write time; a consumer records
    when the line becomes readable in Kafka. Consumer visibility comes after the acks=all ack, so
    this p99 is an honest upper bound of write-to-ack latency.
  * only with `--watermark-cost` (not part of the default run): what watermarks cost, CPU at
    200 lines/s spread over 1,000 files (most idle), watermarks every 60 s vs off.

The agent runs with its default settings and the service image's Kafka client (`--client`,
default: the role's `service_image_agent_kafka_client`) except where a row says otherwise (the
comparison row uses the old 16 MiB `max_buffer_bytes`); each row records the effective `max_buffer_bytes`
and `kafka.linger_ms` as the agent itself resolved them from the config.

Usage: .venv/bin/python bench/bench_agent.py --out bench/results/agent.json [--lines 1000000]
       [--brokers 3] (--brokers 1 for a quick, lighter run: replication drops to 1)
       Watermark cost only: ... --watermark-cost --out bench/results/agent-watermarks.json
       [--watermark-runs 2] [--watermark-files 1000] [--watermark-seconds 150]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer
from keplerlog.agent.config import load as load_agent_config
from keplerlog.record import is_watermark
from keplerlog.testing.kafka_node import KafkaCluster, free_port
from peers.harness import deployed_client  # bench/ is sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
LINE = 200
OLD_BUFFER = 16 * 1024 * 1024  # the default before 4 MiB (now 3 MiB): the comparison row


def replication(cluster: KafkaCluster) -> int:
    """RF 2 as in production, or 1 on a single-broker quick run."""
    return min(2, len(cluster.nodes))


def make_line(i: int, tag: str = "bench") -> bytes:
    """A 200-byte line (newline included) that carries its write time in ns."""
    head = f"{time.time_ns()} {tag} {i:09d} ".encode()
    return head + b"x" * (LINE - 1 - len(head)) + b"\n"


def metrics(port: int, labels: bool = False) -> dict[str, float]:
    """Scalar metrics of the agent's Prometheus page (`labels`: labelled series too, by full name)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and (labels or "{" not in line):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("keplerlog_agent_")] = float(value)
    return out


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Agent:
    """The agent as a subprocess pinned to one core, with its metrics endpoint."""

    def __init__(
        self,
        work: Path,
        bootstrap: str,
        topic: str,
        log: Path,
        core: int,
        limits: dict[str, int] | None = None,
        security: dict[str, str] | None = None,
        serve_metrics: bool = True,
        code: Path | None = None,
        *,
        extra: dict[str, Any] | None = None,
        nofile: int | None = None,
        client: str = "kafka-python",
    ) -> None:
        """`log` may be a glob; `extra`: more top-level config sections (e.g. watermarks);
        `nofile`: the agent's RLIMIT_NOFILE soft limit (capped at the hard one)."""
        self.port = free_port() if serve_metrics else 0
        state = work / "state"
        shutil.rmtree(state, ignore_errors=True)
        cfg = {
            "service": "bench",
            "module": "agent",
            "host": "bench",
            # the default client is left out: the A/B's older agent (`code`) has no such key
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic}
            | ({"client": client} if client != "kafka-python" else {})
            | ({"security": security} if security else {}),
            "state_file": str(state / "agent-state.json"),
            "inputs": [{"paths": [str(log)]}],
            "metrics": {"port": self.port, "log_interval_s": 0},
            "limits": limits or {},
        } | (extra or {})
        path = work / "agent.yml"
        path.write_text(yaml.safe_dump(cfg))
        # What the agent resolves from this file (defaults included), for the JSON.
        self.cfg = load_agent_config(path)
        cmd = [
            sys.executable,
            "-m",
            "keplerlog.agent.main",
            "--config",
            str(path),
            "--log-level",
            "WARNING",
        ]
        if core < os.cpu_count():  # type: ignore[operator]
            cmd = ["taskset", "-c", str(core), *cmd]
        env = os.environ | ({"PYTHONPATH": str(code)} if code else {})  # `code`: another version of it

        def limit() -> None:
            if nofile is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                soft = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.proc = subprocess.Popen(
            cmd, stdout=(work / "agent.out").open("ab"), stderr=subprocess.STDOUT, env=env, preexec_fn=limit
        )
        if not serve_metrics:  # nothing to ask: give it the time it takes to connect
            time.sleep(5)
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent did not start: {(work / 'agent.out').read_text()[-2000:]}")
            return
        deadline = time.monotonic() + 60
        while not metrics(self.port).get("kafka_connected"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"agent did not start: {(work / 'agent.out').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not drain in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench_throughput(
    work: Path,
    cluster: KafkaCluster,
    n: int,
    core: int,
    max_buffer_bytes: int | None = None,
    *,
    topic: str | None = None,
    bootstrap: str | None = None,
    security: dict[str, str] | None = None,
    client: str = "kafka-python",
) -> dict[str, float]:
    """Ship a pre-written file of n lines; lines/s from its appearance to the last ack; peak RSS.

    `bootstrap` and `security` (a kafka.security section) default to the cluster's plaintext
    listener (bench_security.py uses the same broker's SASL_SSL one).
    """
    topic = topic or f"bench-tput-{max_buffer_bytes or 'default'}-{client}-{time.monotonic_ns()}"
    cluster.create_topic(topic, partitions=4, replication=replication(cluster))
    log = work / "logs" / "tput.log"
    data = log.with_suffix(".data")  # written once; linked into place for each run
    log.parent.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        with data.open("wb") as fh:
            block = b"".join(make_line(i) for i in range(1000))
            for _ in range(n // 1000):
                fh.write(block)
    log.unlink(missing_ok=True)
    limits = {"max_buffer_bytes": max_buffer_bytes} if max_buffer_bytes else None
    agent = Agent(work, bootstrap or cluster.bootstrap, topic, log, core, limits, security, client=client)
    try:
        # The file appears whole (a hard link) once the agent is connected and waiting, so the
        # clock starts with the agent's work, not before or after it (a fast run is not
        # over-counted by a first poll that came late).
        started = time.monotonic()
        os.link(data, log)
        deadline = started + 600
        while time.monotonic() < deadline:
            if metrics(agent.port).get("lines_acked_total", 0) >= n:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        hwm = proc_status(agent.proc.pid, "VmHWM")
        cpu = cpu_seconds(agent.proc.pid)
        m = metrics(agent.port)
    finally:
        agent.stop()
    return {
        "lines": n,
        "max_buffer_bytes": agent.cfg.limits.max_buffer_bytes,
        "linger_ms": agent.cfg.kafka.linger_ms,
        "seconds": round(elapsed, 2),
        "lines_per_s": round(n / elapsed),
        "mb_per_s": round(n * LINE / elapsed / 1e6, 1),
        "peak_rss_mb": round(hwm / 1024, 1),
        "agent_cpu_s": round(cpu, 1),
        "records": int(m.get("records_acked_total", 0)),
    }


def steady_writer(
    log: Path,
    rate: int,
    seconds: float,
    stop: threading.Event,
    tag: str,
    batch_every: float,
) -> int:
    """Append `rate` lines/s in small writes (like an application would) for `seconds`."""
    per_write = max(1, round(rate * batch_every))
    written = 0
    start = time.monotonic()
    with log.open("ab", buffering=0) as fh:
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) + per_write
            if due > written:
                fh.write(b"".join(make_line(written + i, tag) for i in range(due - written)))
                written = due
            time.sleep(batch_every)
    return written


def bench_cpu(
    work: Path,
    cluster: KafkaCluster,
    core: int,
    rate: int = 200,
    seconds: float = 20,
    *,
    serve_metrics: bool = True,
    scrape_every: float = 0,
    code: Path | None = None,
    scrape_cost_s: float = 0,
    client: str = "kafka-python",
) -> dict:
    """CPU% of one core while following a file written at `rate` lines/s, one line per write.

    `scrape_every` > 0: a scraper reads the metrics page that often meanwhile (as Prometheus).
    `scrape_cost_s` > 0: then, still at `rate`, the CPU one scrape costs (see `scrape_cost`).
    `code`: the agent from that directory instead of this checkout (the before of an A/B).
    """
    topic = "bench-cpu"
    cluster.create_topic(topic, partitions=4, replication=replication(cluster), exist_ok=True)
    log = work / "logs" / "cpu.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    log.touch()
    agent = Agent(
        work, cluster.bootstrap, topic, log, core, serve_metrics=serve_metrics, code=code, client=client
    )
    scrapes = 0
    per_scrape: dict[str, float] = {}
    try:
        stop = threading.Event()
        holder: dict[str, int] = {}
        t = threading.Thread(
            target=lambda: holder.update(
                n=steady_writer(log, rate, seconds + 3 + 2 * scrape_cost_s, stop, "cpu", 1 / rate)
            )
        )
        t.start()
        time.sleep(3)  # warm-up
        c0, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
        while time.monotonic() - t0 < seconds:
            if scrape_every:
                scrapes += bool(metrics(agent.port))
            time.sleep(scrape_every or seconds)
        c1, t1 = cpu_seconds(agent.proc.pid), time.monotonic()
        rss = proc_status(agent.proc.pid, "VmRSS")
        if scrape_cost_s:
            per_scrape = scrape_cost(agent, scrape_cost_s)
        t.join()
    finally:
        agent.stop()
    return {
        "lines_per_s": rate,
        "seconds": seconds,
        "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 2),
        "rss_mb": round(rss / 1024, 1),
        "max_buffer_bytes": agent.cfg.limits.max_buffer_bytes,
        "linger_ms": agent.cfg.kafka.linger_ms,
        "scrapes": scrapes,
    } | per_scrape


def bench_cpu_runs(work: Path, cluster: KafkaCluster, core: int, runs: int, client: str) -> dict:
    """`bench_cpu` `runs` times: the median run, with every run's CPU % beside it.

    One 20 s run moved between 0.75 and 1.1 % of a core from one `make bench` to the next with
    unchanged code (0.8-1.1 over four alternating runs of three versions), across the 1 % target.
    """
    rows = [bench_cpu(work, cluster, core, client=client) for _ in range(runs)]
    median = sorted(rows, key=lambda r: r["cpu_percent_of_one_core"])[(len(rows) - 1) // 2]
    return median | {"runs": runs, "cpu_percent": spread(rows, "cpu_percent_of_one_core")}


def scrape_cost(agent: Agent, seconds: float) -> dict[str, float]:
    """CPU milliseconds one scrape costs the agent: back-to-back scrapes against the same time unscraped.

    The agent's CPU over `seconds` without scrapes is subtracted from its CPU over `seconds` of
    scrapes one after another; divided by their count. Far steadier than the difference of two
    steady-state runs, whose noise is larger than what a scrape every 15 s costs.
    """
    c0, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
    time.sleep(seconds)
    idle = (cpu_seconds(agent.proc.pid) - c0) / (time.monotonic() - t0)
    c0, t0, n = cpu_seconds(agent.proc.pid), time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        n += bool(metrics(agent.port))
    busy = cpu_seconds(agent.proc.pid) - c0 - idle * (time.monotonic() - t0)
    return {"scrape_cpu_ms": round(1000 * busy / max(n, 1), 3), "scrapes_back_to_back": n}


# The agent's own modules without its metrics, then what its metrics import: the resident memory
# the metrics (prometheus_client's registry and OpenMetrics writer, metrics_http's server) add.
IMPORT_COST = """
import re
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
from keplerlog import lazyinit
from keplerlog.agent import memory
memory.tune_malloc()
lazyinit.defer_package_init("kafka")
import kafka.producer
from keplerlog.agent import checkpoint, config, sender, tailer, watch
before = rss()
import keplerlog.metrics_http
print(rss() - before)
"""


# The last commit whose agent wrote its Prometheus page by hand (http.server, one f-string per
# line); the next one moved it to prometheus_client. The A/B runs that agent from git history.
BEFORE_LIBRARY = "d5a88bd"


def checkout_agent(rev: str, dest: Path) -> Path | None:
    """The agent's package as it was at `rev` (git archive into `dest`); None outside a git clone."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "files/python-agent/keplerlog"], capture_output=True
    )
    if archive.returncode:
        print(f"metrics A/B: no agent at {rev} ({archive.stderr.decode().strip()}); after only")
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "files" / "python-agent"


def spread(rows: list[dict], key: str) -> dict[str, Any]:
    """Median and [min, max] of one figure over runs."""
    values = sorted(r[key] for r in rows)
    return {"median": round(statistics.median(values), 3), "spread": [values[0], values[-1]]}


def bench_metrics_cost(
    work: Path, cluster: KafkaCluster, core: int, runs: int = 3, seconds: float = 20
) -> dict:
    """The agent's CPU and RSS at 200 lines/s before and after prometheus_client, in one run.

    "before" is the agent of BEFORE_LIBRARY (hand-written page), "after" this checkout; the
    order flips every round. Each run: CPU and RSS over `seconds` while scraped every 1 s (ten
    times Prometheus' usual rate), then the CPU of one scrape measured back to back, which
    gives the cost at any scrape interval (`ms per scrape / interval`): at the role's 15 s and
    at 1 s. Plus the resident memory the library's import adds to the agent's other modules.
    """
    before = checkout_agent(BEFORE_LIBRARY, work / "before")
    codes = {"before": before, "after": None} if before else {"after": None}
    samples: dict[str, list[dict]] = {mode: [] for mode in codes}
    for i in range(runs):
        order = list(codes) if i % 2 == 0 else list(reversed(codes))
        for mode in order:
            samples[mode].append(
                bench_cpu(
                    work, cluster, core, seconds=seconds, scrape_every=1.0, code=codes[mode], scrape_cost_s=5
                )
            )
    out: dict[str, Any] = {
        "runs": runs,
        "scrape_every_s": 1.0,
        "before_rev": BEFORE_LIBRARY if before else None,
    }
    for mode, rows in samples.items():
        ms = spread(rows, "scrape_cpu_ms")
        out[mode] = {
            "cpu_percent": spread(rows, "cpu_percent_of_one_core"),
            "rss_mb": spread(rows, "rss_mb"),
            "scrape_cpu_ms": ms,
            # ms per scrape / interval s = ms per s = 0.1 % of a core per ms/s
            "cpu_percent_at_15s_scrape": round(ms["median"] / 15 / 10, 4),
            "cpu_percent_at_1s_scrape": round(ms["median"] / 10, 3),
            "scrapes": [r["scrapes"] for r in rows],
        }
    done = subprocess.run([sys.executable, "-c", IMPORT_COST], capture_output=True, text=True, check=True)
    out["import_rss_mb"] = round(int(done.stdout.strip()) / 1024, 1)
    if before:
        a, b = out["after"], out["before"]
        out["cpu_percent_cost"] = round(a["cpu_percent"]["median"] - b["cpu_percent"]["median"], 2)
        out["cpu_percent_cost_at_15s_scrape"] = round(
            a["cpu_percent_at_15s_scrape"] - b["cpu_percent_at_15s_scrape"], 4
        )
        out["cpu_percent_cost_at_1s_scrape"] = round(
            a["cpu_percent_at_1s_scrape"] - b["cpu_percent_at_1s_scrape"], 3
        )
        out["rss_mb_cost"] = round(a["rss_mb"]["median"] - b["rss_mb"]["median"], 1)
    return out


CLIENTS = ("kafka-python", "librdkafka")


def bench_client_ab(work: Path, cluster: KafkaCluster, core: int, n: int, runs: int = 3) -> dict:
    """The agent with each producer client (kafka.client), alternating, `runs` rounds.

    Per client: CPU and RSS at a steady 200 lines/s (20 s), and lines/s and peak RSS shipping
    the pre-written file of n lines; medians with [min, max].
    """
    rows: dict[str, list[dict]] = {c: [] for c in CLIENTS}
    for i in range(runs):
        for client in CLIENTS if i % 2 == 0 else CLIENTS[::-1]:
            cpu = bench_cpu(work, cluster, core, client=client)
            tput = bench_throughput(work, cluster, n, core, client=client)
            rows[client].append(
                {
                    "cpu_percent": cpu["cpu_percent_of_one_core"],
                    "rss_mb": cpu["rss_mb"],
                    "lines_per_s": tput["lines_per_s"],
                    "peak_rss_mb": tput["peak_rss_mb"],
                }
            )
    out: dict[str, Any] = {"runs": runs, "lines": n}
    for client, got in rows.items():
        out[client] = {
            key: spread(got, key) for key in ("cpu_percent", "rss_mb", "lines_per_s", "peak_rss_mb")
        }
    return out


def spread_writer(paths: list[Path], rate: int, stop: threading.Event, batch_every: float = 0.05) -> int:
    """Append `rate` lines/s in total, round-robin over `paths`, until `stop` is set."""
    written = 0
    start = time.monotonic()
    handles = [p.open("ab", buffering=0) for p in paths]
    try:
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while written < due:
                handles[written % len(handles)].write(make_line(written, "wm"))
                written += 1
            time.sleep(batch_every)
    finally:
        for fh in handles:
            fh.close()
    return written


def watermark_run(
    work: Path,
    cluster: KafkaCluster,
    core: int,
    interval_s: float,
    *,
    files: int,
    busy: int,
    rate: int,
    seconds: float,
) -> dict:
    """One run of `bench_watermark_cost`: a fresh log directory, agent, warm-up, CPU over `seconds`."""
    topic = "bench-wm"
    cluster.create_topic(topic, partitions=4, replication=replication(cluster), exist_ok=True)
    logs = work / "logs-wm"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    paths = [logs / f"app-{i:04d}.log" for i in range(files)]
    for i, p in enumerate(paths):  # every file holds a little at the start: the idle ones stay so
        p.write_bytes(b"".join(make_line(n, f"idle{i}") for n in range(5)))
    agent = Agent(
        work,
        cluster.bootstrap,
        topic,
        logs / "*.log",
        core,
        extra={"watermarks": {"interval_s": interval_s}},
        nofile=files + 1024,
    )
    try:
        deadline = time.monotonic() + 120
        while metrics(agent.port).get("lines_acked_total", 0) < 5 * files:
            if time.monotonic() > deadline:
                raise RuntimeError("the initial lines of the files were not shipped in 120 s")
            time.sleep(0.2)
        stop = threading.Event()
        holder: dict[str, int] = {}
        t = threading.Thread(target=lambda: holder.update(n=spread_writer(paths[:busy], rate, stop)))
        t.start()
        time.sleep(3)  # warm-up
        m0 = metrics(agent.port)
        c0, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(agent.proc.pid), time.monotonic()
        m1 = metrics(agent.port)
        stop.set()
        t.join()
        rss = proc_status(agent.proc.pid, "VmRSS")
    finally:
        agent.stop()
    return {
        "interval_s": interval_s,
        "cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 3),
        "rss_mb": round(rss / 1024, 1),
        "watermarks_sent": int(m1.get("watermarks_sent_total", 0) - m0.get("watermarks_sent_total", 0)),
        "lines_acked": int(m1.get("lines_acked_total", 0) - m0.get("lines_acked_total", 0)),
        "files_open": int(m1.get("files_open", 0)),
    }


def bench_watermark_cost(
    work: Path,
    cluster: KafkaCluster,
    core: int,
    runs: int = 2,
    *,
    files: int = 1000,
    busy: int = 50,
    rate: int = 200,
    seconds: float = 150.0,
    interval_s: float = 60.0,
) -> dict:
    """What watermarks cost the agent: CPU at `rate` lines/s spread over `busy` of `files` files
    (the others idle), watermarks every `interval_s` (the default 60 s) vs off (interval_s 0).

    `runs` rounds of A B, the order flipped every round (A B B A ...), so a drift of the machine
    hits both; each measures `seconds` after the files' first lines are shipped and a warm-up:
    150 s hold two full passes at 60 s (the first one sends a watermark for each of the 1,000
    files, the next ones only for the busy files). Medians and spread per mode.
    """
    samples: dict[str, list[dict]] = {"on": [], "off": []}
    for i in range(runs):
        order = ["on", "off"] if i % 2 == 0 else ["off", "on"]
        for mode in order:
            samples[mode].append(
                watermark_run(
                    work,
                    cluster,
                    core,
                    interval_s if mode == "on" else 0,
                    files=files,
                    busy=busy,
                    rate=rate,
                    seconds=seconds,
                )
            )
    out: dict[str, Any] = {
        "runs": runs,
        "files": files,
        "busy_files": busy,
        "lines_per_s": rate,
        "seconds": seconds,
        "interval_s": interval_s,
    }
    for mode, rows in samples.items():
        cpu = sorted(r["cpu_percent_of_one_core"] for r in rows)
        rss = sorted(r["rss_mb"] for r in rows)
        out[mode] = {
            "cpu_percent_median": statistics.median(cpu),
            "cpu_percent_spread": [cpu[0], cpu[-1]],
            "rss_mb_median": statistics.median(rss),
            "rss_mb_spread": [rss[0], rss[-1]],
            "watermarks_sent": [r["watermarks_sent"] for r in rows],
            "lines_acked": [r["lines_acked"] for r in rows],
            "files_open": [r["files_open"] for r in rows],
        }
    out["cpu_percent_cost"] = round(out["on"]["cpu_percent_median"] - out["off"]["cpu_percent_median"], 3)
    out["rss_mb_cost"] = round(out["on"]["rss_mb_median"] - out["off"]["rss_mb_median"], 1)
    return out


def bench_latency(
    work: Path,
    cluster: KafkaCluster,
    core: int,
    rate: int = 10_000,
    seconds: float = 10,
    client: str = "kafka-python",
) -> dict:
    """Write-to-visible-in-Kafka latency per line at `rate` lines/s (upper bound of write-to-ack)."""
    cluster.create_topic("bench-lat", partitions=4, replication=replication(cluster))
    log = work / "logs" / "lat.log"
    log.unlink(missing_ok=True)
    log.touch()
    agent = Agent(work, cluster.bootstrap, "bench-lat", log, core, client=client)
    consumer = KafkaConsumer(
        "bench-lat",
        bootstrap_servers=cluster.bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=10,
    )
    try:
        consumer.poll(timeout_ms=2000)  # join/assign before writing
        stop = threading.Event()
        holder: dict[str, int] = {}
        t = threading.Thread(
            target=lambda: holder.update(n=steady_writer(log, rate, seconds, stop, "lat", 0.01))
        )
        t.start()
        lat: list[float] = []
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=100).values():
                now = time.time_ns()
                for m in msgs:
                    if is_watermark(m.headers):
                        continue  # the agent's per-file account, no lines
                    for line in m.value.splitlines():
                        lat.append((now - int(line.split(b" ", 1)[0])) / 1e9)
            if not t.is_alive() and len(lat) >= holder.get("n", 1 << 60):
                break
        stop.set()
        t.join()
    finally:
        consumer.close()
        agent.stop()
    lat.sort()

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None

    return {
        "lines_per_s": rate,
        "seconds": seconds,
        "lines_written": holder.get("n", 0),
        "lines_seen": len(lat),
        "p50_s": q(0.50),
        "p99_s": q(0.99),
        "max_s": q(1.0),
        "linger_ms": agent.cfg.kafka.linger_ms,
    }


def main() -> int:
    """Run all three measurements; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "agent.json")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument(
        "--client",
        choices=("kafka-python", "librdkafka"),
        default=deployed_client(),
        help="the agent's kafka.client for every row but the A/Bs (default: the service image's)",
    )
    parser.add_argument("--metrics-runs", type=int, default=3, help="alternating runs of the metrics cost")
    parser.add_argument("--brokers", type=int, default=3, help="Kafka brokers (1: quick run, RF 1)")
    parser.add_argument(
        "--watermark-cost",
        action="store_true",
        help="measure only what watermarks cost (on vs off, alternating) and write that JSON",
    )
    parser.add_argument("--cpu-runs", type=int, default=3, help="runs of the CPU at 200 lines/s (median)")
    parser.add_argument("--watermark-runs", type=int, default=2, help="rounds of on/off")
    parser.add_argument("--watermark-files", type=int, default=1000)
    parser.add_argument("--watermark-seconds", type=float, default=150.0, help="measured per run")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "bench" / "work",
        help="a fresh temporary directory is made in here (parallel runs do not collide)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="agent-", dir=args.work))
    cluster = KafkaCluster(work / "kafka", size=args.brokers)
    if args.watermark_cost:
        return main_watermarks(args, work, cluster)
    try:
        cluster.start()
        results = {
            "client": args.client,
            "throughput": bench_throughput(work, cluster, args.lines, args.core, client=args.client),
            "throughput_16mib_buffer": bench_throughput(
                work, cluster, args.lines, args.core, OLD_BUFFER, client=args.client
            ),
            "cpu_200_lines_s": bench_cpu_runs(work, cluster, args.core, args.cpu_runs, args.client),
            "metrics_cost_200_lines_s": bench_metrics_cost(work, cluster, args.core, args.metrics_runs),
            "client_ab": bench_client_ab(work, cluster, args.core, args.lines, args.metrics_runs),
            "latency_10k_lines_s": bench_latency(work, cluster, args.core, client=args.client),
        }
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)
    t, t16 = results["throughput"], results["throughput_16mib_buffer"]
    c, lat = results["cpu_200_lines_s"], results["latency_10k_lines_s"]
    rows = [
        (
            f"throughput, defaults (lines/s, 200 B, {args.brokers} brokers, acks=all)",
            t["lines_per_s"],
            ">= 100000",
        ),
        ("peak RSS during throughput, defaults (MB)", t["peak_rss_mb"], "<= 40"),
        (
            "throughput, max_buffer_bytes 16 MiB (lines/s)",
            t16["lines_per_s"],
            "(comparison)",
        ),
        ("peak RSS, max_buffer_bytes 16 MiB (MB)", t16["peak_rss_mb"], "(comparison)"),
        (
            f"CPU at 200 lines/s, linger_ms {c['linger_ms']} (% of one core)",
            c["cpu_percent_of_one_core"],
            "<= 2",
        ),
        ("p99 write->visible at 10k lines/s (s)", lat["p99_s"], "<= 0.5"),
        (
            "prometheus_client vs hand-written page: CPU per scrape at 15 s (% of a core)",
            results["metrics_cost_200_lines_s"].get("cpu_percent_cost_at_15s_scrape"),
            "<= 0.2",
        ),
        (
            "the same scraped every 1 s (% of a core)",
            results["metrics_cost_200_lines_s"].get("cpu_percent_cost_at_1s_scrape"),
            "<= 0.2",
        ),
        (
            "prometheus_client vs hand-written page: RSS (MB)",
            results["metrics_cost_200_lines_s"].get("rss_mb_cost"),
            "<= 2",
        ),
    ]
    print(f"{'measure':52} {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:52} {value!s:>10}  {target}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main_watermarks(args: argparse.Namespace, work: Path, cluster: KafkaCluster) -> int:
    """`--watermark-cost`: only that measurement, its table and its JSON."""
    try:
        cluster.start()
        wm = bench_watermark_cost(
            work,
            cluster,
            args.core,
            args.watermark_runs,
            files=args.watermark_files,
            seconds=args.watermark_seconds,
        )
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'measure':52} {'value':>10}  target")
    for mode in ("off", "on"):
        row = wm[mode]
        when = f"every {wm['interval_s']:g} s" if mode == "on" else "off"
        name = f"CPU, watermarks {when} (% of one core)"
        print(f"{name:52} {row['cpu_percent_median']!s:>10}  spread {row['cpu_percent_spread']}")
    print(f"{'watermark CPU cost (% of one core)':52} {wm['cpu_percent_cost']!s:>10}  (next to nothing)")
    print(f"{'watermarks sent per run':52} {wm['on']['watermarks_sent']!s:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"watermark_cost_200_lines_s": wm}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

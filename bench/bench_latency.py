"""End-to-end latency of kepler-log: a line written to a log file until it is in a day file.

For each fixed rate (default 1k, 10k, 50k lines/s, ~15 s each, `--rounds` times: the rates'
order flips every round, and a fresh agent and consumer serve each run; before the rounds, one
unmeasured `--warmup-s` run at the highest rate warms the freshly started brokers) a writer
process appends
200-byte lines that carry their write time (time.time_ns(), the wall clock every process
shares) to a log file; the agent ships them to a 3-node local Kafka (RF 2, acks=all) and the
consumer writes day files; a reader tails the day files and records read time - write time
per line. Reported per rate: the median over the rounds of each run's p50/p90/p99/p99.9/max,
with the min-max of p50 and p99 (is it steady across runs?), lines lost and duplicated over all
rounds, and the agent's and consumer's CPU and peak RSS; every run's own figures under `runs`. And where the time goes: the topic keeps the broker's append time
(LogAppendTime), and a tap reads the topic alongside the consumer (the first line of each
record is enough: a record is consecutive lines of one file), so each line's delay splits into
  * write -> agent read (`kl.ts`): inotify, then the agent's read wait (about
    `read_coalesce_lines` lines' time, 20 ms to `read_coalesce_ms`);
  * agent read -> broker append: the record's assembly, the producer's linger, the request;
  * broker append -> fetched: replication to the follower (acks=all; a consumer sees a record
    only then) and a fetch, as the tap (a plain kafka-python consumer, like the consumer's)
    gets it;
  * fetched -> day file: the rest, the consumer's own part: its batch gathering
    (`batch_idle_ms`, `batch_max_wait_ms`), write and fsync, and this script's polling of the
    day file.
The tap's own reads cost some CPU on the same machine. Usage:

    .venv/bin/python bench/bench_latency.py --out bench/results/latency.json

`--pipeline passthrough` replaces agent + consumer with a trivial file-to-file copier: the
harness's own floor (writer, reader, polling), and a way to test this script on its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from peers.harness import (
    RESULTS_DIR,
    WORK_DIR,
    Tool,
    create_topic,
    deployed_client,
    exit_on_sigterm,
    kafka_cluster,
    machine_info,
)
from peers.tools import agent_command, consumer_command

SERVICE = "bench"
MODULE = "latency"
LINE_BYTES = 200
PROBE, MEASURED = b"P", b"L"


def format_lines(ts_ns: int, first_seq: int, count: int, size: int, kind: bytes) -> bytes:
    """`count` lines of `size` bytes: `<write time ns> <seq> <kind> xxxx...\\n`."""
    out = []
    for seq in range(first_seq, first_seq + count):
        head = b"%019d %09d %s " % (ts_ns, seq, kind)
        out.append(head + b"x" * (size - len(head) - 1) + b"\n")
    return b"".join(out)


def parse_line(line: bytes) -> tuple[int, int, bytes] | None:
    """(write time ns, seq, kind) of a benchmark line, None for anything else."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or len(parts[0]) != 19:
        return None
    try:
        return int(parts[0]), int(parts[1]), parts[2]
    except ValueError:
        return None


def writer(path: str, rate: int, duration: float, size: int) -> None:
    """Append lines at `rate` lines/s for `duration` s, each stamped when it is written.

    Runs in its own process so the reader's work cannot delay writes (and so skew the
    figures). Due lines are written in one write() per ~1 ms tick, as an app's logger would.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    total = int(rate * duration)
    written = 0
    start = time.monotonic()
    try:
        while written < total:
            due = min(total, int((time.monotonic() - start) * rate)) - written
            if due > 0:
                os.write(fd, format_lines(time.time_ns(), written, due, size, MEASURED))
                written += due
            else:
                time.sleep(0.0005)
    finally:
        os.close(fd)


def passthrough(src_dir: str, dst: str) -> None:
    """The `--pipeline passthrough` stand-in for agent + consumer: copy new lines across."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    out = os.open(dst, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    offsets: dict[Path, int] = {}
    while True:
        moved = False
        for path in Path(src_dir).glob("*.log"):
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1
            if end:
                os.write(out, data[:end])
                offsets[path] = offsets.get(path, 0) + end
                moved = True
        if not moved:
            time.sleep(0.001)


class DayFileReader:
    """Tail every day file of the benchmark module (a new day starts a new file)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / SERVICE
        self.files: dict[Path, tuple[int, bytes]] = {}
        self.next_scan = 0.0

    def _scan(self) -> None:
        if time.monotonic() < self.next_scan:
            return
        self.next_scan = time.monotonic() + 0.2
        for path in self.dir.glob(f"{MODULE}.*"):
            if path not in self.files and path.is_file():
                self.files[path] = (os.open(path, os.O_RDONLY), b"")

    def read(self) -> tuple[int, list[bytes]]:
        """Complete new lines from all files and the time (ns) they were read."""
        self._scan()
        lines: list[bytes] = []
        for path, (fd, partial) in list(self.files.items()):
            data = os.read(fd, 8 << 20)
            if not data:
                continue
            data = partial + data
            end = data.rfind(b"\n") + 1
            lines.extend(data[:end].splitlines())
            self.files[path] = (fd, data[end:])
        return time.time_ns(), lines

    def close(self) -> None:
        """Close the files."""
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()


class Tap:
    """Reads the topic beside the consumer: per measured seq, the agent's read time (`kl.ts`), the
    broker's append time (the record timestamp of a LogAppendTime topic) and when the tap got
    the record, all in ms."""

    def __init__(self, bootstrap: str, topic: str, total: int) -> None:
        from kafka import KafkaConsumer
        from keplerlog.record import decode_headers, is_watermark

        self.read_ms = array("q", [-1]) * total
        self.append_ms = array("q", [-1]) * total
        self.fetched_ms = array("q", [-1]) * total
        self._decode, self._is_watermark = decode_headers, is_watermark
        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                      auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        total = len(self.read_ms)
        while not self.stop.is_set():
            for recs in self.consumer.poll(timeout_ms=100).values():
                now_ms = time.time_ns() // 1_000_000
                for r in recs:
                    if self._is_watermark(r.headers):
                        continue
                    got = parse_line(r.value[: r.value.find(b"\n")])
                    if got is None or got[2] != MEASURED:
                        continue
                    labels = self._decode(r.headers)
                    for seq in range(got[1], min(total, got[1] + labels.lines)):
                        self.read_ms[seq] = labels.ts_ms
                        self.append_ms[seq] = r.timestamp
                        self.fetched_ms[seq] = now_ms

    def close(self) -> None:
        """Stop reading."""
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


def breakdown(write_ns: array, day_ns: array, tap: Tap) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of each stage, over the lines the tap saw."""
    stages: dict[str, list[float]] = {
        "write_to_read": [],
        "read_to_broker": [],
        "broker_to_fetched": [],
        "fetched_to_day_file": [],
        "broker_to_day_file": [],
    }
    for seq, (w, d) in enumerate(zip(write_ns, day_ns, strict=True)):
        read, append, fetched = tap.read_ms[seq], tap.append_ms[seq], tap.fetched_ms[seq]
        if d < 0 or read < 0 or append < 0:
            continue
        stages["write_to_read"].append(read - w / 1e6)
        stages["read_to_broker"].append(append - read)
        stages["broker_to_fetched"].append(fetched - append)
        stages["fetched_to_day_file"].append(d / 1e6 - fetched)
        stages["broker_to_day_file"].append(d / 1e6 - append)
    out = {}
    for name, values in stages.items():
        values.sort()
        out[name] = {
            "p50_ms": round(percentile(values, 0.5), 1) if values else None,
            "p99_ms": round(percentile(values, 0.99), 1) if values else None,
            "lines": len(values),
        }
    return out


SUMMED = ("written", "received", "missing", "duplicates")
MEDIAN = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "agent_cpu_s", "consumer_cpu_s",
          "agent_rss_mb", "consumer_rss_mb", "ready_s")  # fmt: skip


def summarize(rate: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One rate over its rounds: medians (p50, p99 also min-max), lost and duplicated summed.

    A failed run counts: `ok` only if every round delivered every line once, its error is kept.
    """
    out: dict[str, Any] = {"rate": rate, "rounds": len(runs), "ok": all(r.get("ok") for r in runs)}
    out["error"] = "; ".join(f"round {r['round']}: {r['error']}" for r in runs if r.get("error"))[:600]
    for key in SUMMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = sum(values) if values else None
    for key in MEDIAN:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = round(statistics.median(values), 2) if values else None
        if key in ("p50_ms", "p99_ms") and values:
            out[key.replace("_ms", "_spread_ms")] = [min(values), max(values)]
    stages: dict[str, dict[str, Any]] = {}
    for r in runs:
        for stage, figures in (r.get("breakdown") or {}).items():
            for key, value in figures.items():
                if value is not None:
                    stages.setdefault(stage, {}).setdefault(key, []).append(value)
    if stages:  # each stage's p50 / p99: the median over the rounds
        out["breakdown"] = {
            stage: {key: round(statistics.median(v), 1) for key, v in figures.items()}
            for stage, figures in stages.items()
        }
    out["runs"] = runs
    return out


def percentile(values: list[int], q: float) -> float:
    """The q-quantile (0..1) of sorted `values`, nearest rank."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def _yaml_configs(run: Path, bootstrap: str, topic: str, args: argparse.Namespace) -> tuple[Path, Path]:
    agent = run / "agent.yml"
    agent.write_text(
        f"service: {SERVICE}\nmodule: {MODULE}\nhost: bench\n"
        f'kafka:\n  bootstrap_servers: "{bootstrap}"\n  topic: {topic}\n'
        f"  compression: lz4\n  client: {args.agent_client}\n"
        f"state_file: {run / 'agent-state.json'}\n"
        f'inputs:\n  - paths: ["{run / "logs"}/*.log"]\n'
        "metrics:\n  port: 0\n  log_interval_s: 3600\n"
        + (
            ""
            if args.read_coalesce_lines is None
            else f"limits:\n  read_coalesce_lines: {args.read_coalesce_lines}\n"
        )
    )
    consumer = run / "consumer.yml"
    consumer.write_text(
        f'kafka:\n  bootstrap_servers: "{bootstrap}"\n  topic: {topic}\n'
        f"  group_id: bench-latency-{topic}\n  client: {args.consumer_client}\n"
        f"root: {run / 'root'}\n"
        'layout: "{service}/{module}.{day}"\ntimezone: UTC\n'
        "metrics:\n  port: 0\n  log_interval_s: 3600\n"
    )
    return agent, consumer


def _start_pipeline(
    args: argparse.Namespace, run: Path, bootstrap: str, rate: int
) -> tuple[list[tuple[str, Tool]], str]:
    if args.pipeline == "passthrough":
        cmd = [sys.executable, __file__, "--passthrough-worker", str(run / "logs")]
        cmd.append(str(run / "root" / SERVICE / f"{MODULE}.passthrough"))
        tool = Tool(cmd, run / "passthrough.log", cpu=args.cpu)
        tool.start()
        return [("passthrough", tool)], ""
    topic = f"bench-latency-{rate}-{int(time.time())}"
    # the broker's append time as the record timestamp: the breakdown's middle stamp
    create_topic(
        bootstrap, topic, partitions=4, replication=2, configs={"message.timestamp.type": "LogAppendTime"}
    )
    agent_yml, consumer_yml = _yaml_configs(run, bootstrap, topic, args)
    consumer_cmd = [*(consumer_command() or []), "--config", str(consumer_yml)]
    agent_cmd = [*(agent_command() or []), "--config", str(agent_yml)]
    # Only the agent is pinned, as in the peer benchmark; the consumer runs elsewhere.
    consumer = Tool(consumer_cmd, run / "consumer.log", cpu=None)
    agent = Tool(agent_cmd, run / "agent.log", cpu=args.cpu)
    consumer.start()
    agent.start()
    return [("consumer", consumer), ("agent", agent)], topic


def _wait_ready(reader: DayFileReader, logfile: Path, tools: list[tuple[str, Tool]], timeout: float) -> float:
    """Append a probe line each second until one shows in a day file; return the wait."""
    start = time.monotonic()
    seq = 0
    next_probe = 0.0
    while time.monotonic() - start < timeout:
        for name, tool in tools:
            if err := tool.dead():
                raise RuntimeError(f"{name} {err}")
        if time.monotonic() >= next_probe:
            with logfile.open("ab") as f:
                f.write(format_lines(time.time_ns(), seq, 1, LINE_BYTES, PROBE))
            seq += 1
            next_probe = time.monotonic() + 1
        _, lines = reader.read()
        if any(p and p[2] == PROBE for p in map(parse_line, lines)):
            return time.monotonic() - start
        time.sleep(0.01)
    raise TimeoutError(f"no probe line reached a day file within {timeout:.0f} s")


def run_rate(args: argparse.Namespace, bootstrap: str, rate: int) -> dict[str, Any]:
    """Measure one rate; failures become a result with an error, never an exception."""
    res: dict[str, Any] = {
        "rate": rate,
        "duration_s": args.duration,
        "ok": False,
        "error": "",
    }
    run = WORK_DIR / "latency" / f"{args.pipeline}-{rate}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "logs").mkdir(parents=True)
    (run / "root" / SERVICE).mkdir(parents=True)
    logfile = run / "logs" / "app.log"
    logfile.touch()  # present before the agent starts: it must find something to follow
    total = int(rate * args.duration)
    tools: list[tuple[str, Tool]] = []
    reader = DayFileReader(run / "root")
    proc: Any = None
    tap: Tap | None = None
    try:
        tools, topic = _start_pipeline(args, run, bootstrap, rate)
        res["ready_s"] = round(_wait_ready(reader, logfile, tools, args.startup_timeout), 2)
        time.sleep(0.5)
        reader.read()  # drop the probes still in flight
        cpu0 = {name: tool.sample().cpu_s for name, tool in tools}
        latencies = array("q")
        seen = bytearray(total)
        # per seq: write and day-file times (ns) for the breakdown
        write_ns, day_ns = array("q", [-1]) * total, array("q", [-1]) * total
        tap = Tap(bootstrap, topic, total) if topic else None
        proc = mp.get_context("spawn").Process(
            target=writer, args=(str(logfile), rate, args.duration, LINE_BYTES)
        )
        t0 = time.monotonic()
        proc.start()
        drain_until = 0.0
        received = dupes = 0
        while received < total:
            now_ns, lines = reader.read()
            for line in lines:
                got = parse_line(line)
                if got is None or got[2] != MEASURED or got[1] >= total:
                    continue
                if seen[got[1]]:
                    dupes += 1
                    continue
                seen[got[1]] = 1
                received += 1
                latencies.append(now_ns - got[0])
                write_ns[got[1]], day_ns[got[1]] = got[0], now_ns
            if not lines:
                time.sleep(0.001)
            if not drain_until and not proc.is_alive():
                res["write_s"] = round(time.monotonic() - t0, 2)
                drain_until = time.monotonic() + args.drain_timeout
            if drain_until and time.monotonic() > drain_until:
                break
            for name, tool in tools:
                if err := tool.dead():
                    raise RuntimeError(f"{name} {err} ({received}/{total} lines)")
        ordered = sorted(latencies)
        ms = 1e6
        res.update(
            ok=received == total,
            written=total,
            received=received,
            missing=total - received,
            duplicates=dupes,
            p50_ms=round(percentile(ordered, 0.50) / ms, 2),
            p90_ms=round(percentile(ordered, 0.90) / ms, 2),
            p99_ms=round(percentile(ordered, 0.99) / ms, 2),
            p999_ms=round(percentile(ordered, 0.999) / ms, 2),
            max_ms=round(ordered[-1] / ms, 2) if ordered else None,
        )
        if tap is not None:
            time.sleep(1)  # the tap's last records
            tap.close()
            res["breakdown"] = breakdown(write_ns, day_ns, tap)
            tap = None
        if received < total:
            res["error"] = f"{total - received} of {total} lines not in a day file after drain"
        for name, tool in tools:
            res[f"{name}_cpu_s"] = round(tool.sample().cpu_s - cpu0[name], 2)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        if tap is not None:
            tap.close()
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
        for name, tool in tools:
            tool.stop()
            res[f"{name}_rss_mb"] = round(tool.peak_rss_mb(), 1)
        reader.close()
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the rates and write the JSON; exit 2 when the pipeline is not installed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "latency.json")
    ap.add_argument("--rates", default="1000,10000,50000", help="lines/s, comma-separated")
    ap.add_argument("--duration", type=float, default=15, help="seconds per rate")
    ap.add_argument("--rounds", type=int, default=3, help="runs per rate (the order flips each round)")
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=10,
        help="one unmeasured run at the highest rate first, this long (0: none)",
    )
    ap.add_argument("--cpu", type=int, default=1, help="core the agent is pinned to (-1: none)")
    ap.add_argument("--startup-timeout", type=float, default=120)
    ap.add_argument("--drain-timeout", type=float, default=30)
    ap.add_argument("--pipeline", choices=("keplerlog", "passthrough"), default="keplerlog")
    ap.add_argument(
        "--agent-client",
        choices=("kafka-python", "librdkafka"),
        default=deployed_client(),
        help="the agent's kafka.client (default: the service image's)",
    )
    ap.add_argument("--read-coalesce-lines", type=int, help="the agent's limits.read_coalesce_lines")
    ap.add_argument(
        "--consumer-client",
        choices=("kafka-python", "librdkafka"),
        default="kafka-python",
        help="the consumer's kafka.client (default: the package's; the consumer role deploys librdkafka)",
    )
    ap.add_argument("--passthrough-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.passthrough_worker:
        passthrough(*args.passthrough_worker)
        return 0
    if args.cpu < 0 or (os.cpu_count() or 1) <= args.cpu:
        args.cpu = None
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    out: dict[str, Any] = {
        "machine": machine_info(),
        "setup": {
            "pipeline": args.pipeline,
            "kafka_nodes": 3,
            "partitions": 4,
            "replication": 2,
            "line_bytes": LINE_BYTES,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup_s,
            "pinned_cpu": args.cpu,
            "agent_client": args.agent_client,
            "consumer_client": args.consumer_client,
            "read_coalesce_lines": args.read_coalesce_lines,  # None: the agent's default
        },
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.pipeline == "keplerlog":
        commands = {"agent": agent_command(), "consumer": consumer_command()}
        missing = [name for name, cmd in commands.items() if cmd is None]
        if missing:
            msg = (
                f"bench_latency: the kepler-log {' and '.join(missing)} is not installed "
                "(no keplerlog.agent.main / keplerlog.consumer.main); run `make venv` once "
                "they have landed"
            )
            print(msg, file=sys.stderr)
            out["error"] = msg
            args.out.write_text(json.dumps(out, indent=2) + "\n")
            return 2

    def measure(bootstrap: str) -> None:
        runs: dict[int, list[dict[str, Any]]] = {rate: [] for rate in rates}
        if args.warmup_s > 0:
            # The brokers were just started: their first seconds of produce and fetch run in
            # the JVM's interpreter (a first run had p99 300-700 ms in the agent -> broker
            # stage alone, the later ones under 150 ms). A service's cluster is long warm, so
            # that start is kept out of the rounds, and its figures are kept under "warmup".
            warm = argparse.Namespace(**{**vars(args), "duration": args.warmup_s})
            out["warmup"] = run_rate(warm, bootstrap, max(rates))
            print(
                f"warm-up  {max(rates):>7,} lines/s  {args.warmup_s:.0f} s  p99 {out['warmup'].get('p99_ms')} ms"
                f"  (not counted)",
                flush=True,
            )
        for n in range(args.rounds):
            for rate in rates if n % 2 == 0 else rates[::-1]:
                res = run_rate(args, bootstrap, rate) | {"round": n + 1}
                runs[rate].append(res)
                if res.get("p50_ms") is not None:
                    print(
                        f"round {n + 1}  {rate:>7,} lines/s  p50 {res['p50_ms']:8.2f} ms"
                        f"  p99 {res['p99_ms']:8.2f} ms  max {res['max_ms']:8.2f} ms"
                        f"  {res['received']}/{res['written']} lines"
                        + (f"  ERROR {res['error']}" if res["error"] else ""),
                        flush=True,
                    )
                else:
                    print(f"round {n + 1}  {rate:>7,} lines/s  FAILED: {res['error']}", flush=True)
        out["results"] = [summarize(rate, runs[rate]) for rate in rates]
        for r in out["results"]:
            print(
                f"{r['rate']:>7,} lines/s over {r['rounds']} rounds: p50 {r['p50_ms']} ms "
                f"{r.get('p50_spread_ms')}, p99 {r['p99_ms']} ms {r.get('p99_spread_ms')}, "
                f"{r['missing']} missing, {r['duplicates']} duplicated",
                flush=True,
            )

    if args.pipeline == "passthrough":
        measure("")
    else:
        with kafka_cluster(WORK_DIR / "kafka-latency", size=3) as cluster:
            measure(cluster.bootstrap)  # type: ignore[attr-defined]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Peer benchmark: how fast kepler-log's agent and its alternatives move a log file into Kafka.

Every tool ships the same pre-written file (N lines of 200 bytes, and a 2 KB-line variant) to
its own topic on a 3-node local KRaft cluster (RF 2, 4 partitions, acks=all), pinned to one
core. Measured: lines/s and MB/s until the last line is in Kafka, CPU seconds (user + sys)
spent shipping, and peak RSS. A tool that is missing, crashes or times out is reported as
failed with the reason; the run goes on. Usage:

    .venv/bin/python bench/bench_peers.py --out bench/results/peers.json [--lines 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers.harness import (
    RESULTS_DIR,
    WORK_DIR,
    Tool,
    TopicCounter,
    create_topic,
    exit_on_sigterm,
    kafka_cluster,
    machine_info,
    make_line,
    wait_count,
    write_workload,
)
from peers.tools import ALL, Peer, RunSpec

MB = 1_000_000


def _probe(spec: RunSpec, tool: Tool, counter: TopicCounter, size: int, timeout: float) -> int:
    """Wait until a tailing tool has shipped a probe line; return the lines then in Kafka.

    A new probe file is written every 3 s until one arrives: a tool that was still starting
    may have missed the first (some tailers start at the end of files present at start-up).
    """
    import random

    deadline = time.monotonic() + timeout
    written = 0
    next_probe = 0.0
    while counter.count() < 1:
        if err := tool.dead():
            raise RuntimeError(f"died during start-up: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no probe line reached Kafka within {timeout:.0f} s: {tool.tail()}")
        if time.monotonic() >= next_probe:
            written += 1
            probe = spec.watch / f"probe-{written}.log"
            probe.write_bytes(make_line(written, size, random.Random(written)))
            next_probe = time.monotonic() + 3
        time.sleep(0.05)
    # Let the other probes land so they are not counted as workload lines.
    settle = time.monotonic() + 3
    while counter.count() < written and time.monotonic() < settle:
        time.sleep(0.05)
    return counter.count()


def _watchdog(tool: Tool, grace: float = 10) -> Callable[[], str]:
    """Tell wait_count when a tool failed: it exited non-zero, or exited 0 (kcat, done) and
    its lines are still missing `grace` seconds later."""
    exited_ok: list[float] = []

    def check() -> str:
        tool.sample()  # short-lived tools (kcat) must be seen alive for their VmHWM
        if not tool.reap():
            return ""
        if tool.returncode:
            return f"exited with code {tool.returncode}: {tool.tail()}"
        exited_ok.append(time.monotonic())
        if exited_ok[-1] - exited_ok[0] > grace:
            return f"exited 0 but lines are missing {grace:.0f} s later: {tool.tail()}"
        return ""

    return check


def run_one(
    peer: Peer,
    bootstrap: str,
    workload: Path,
    lines: int,
    size: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Ship `workload` with one tool and measure it; never raises, failures become results."""
    variant = f"{size}B" if size < 1000 else f"{size // 1000}KB"
    result: dict[str, Any] = {
        "tool": peer.name,
        "variant": variant,
        "line_bytes": size,
        "lines": lines,
        "bytes": lines * size,
        "ok": False,
        "error": "",
        "notes": peer.notes,
        "version": "",
    }
    if reason := peer.missing():
        result["error"] = reason
        return result
    result["version"] = peer.version()
    workdir = WORK_DIR / "peers" / f"{peer.name}-{variant}"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "watch").mkdir(parents=True)
    topic = f"bench-{peer.name}-{variant}-{int(time.time())}"
    spec = RunSpec(workdir, workdir / "watch", workload, bootstrap, topic, args.cpu)
    tool: Tool | None = None
    counter: TopicCounter | None = None
    try:
        create_topic(bootstrap, topic, partitions=4, replication=2)
        counter = TopicCounter(bootstrap, topic, headers=peer.lines_in_headers)
        tool = peer.tool(spec)
        tool.start()
        if peer.mode == "file":
            t0 = tool.started
            cpu0 = 0.0
            baseline = 0
        else:
            baseline = _probe(spec, tool, counter, size, args.startup_timeout)
            result["startup_s"] = round(time.monotonic() - tool.started, 2)
            cpu0 = tool.sample().cpu_s
            t0 = time.monotonic()
            os.link(workload, spec.watch / "app.log")  # appears whole, as a new file
        t_first, t_end = wait_count(
            counter,
            baseline + lines,
            args.timeout,
            alive=_watchdog(tool),
            start=baseline,
        )
        if peer.mode == "file":
            tool.wait(30)
            if tool.returncode:
                raise RuntimeError(f"exited with code {tool.returncode}: {tool.tail()}")
        cpu = tool.sample().cpu_s - cpu0
        seconds = max(t_end - t0, 1e-6)
        result.update(
            ok=True,
            seconds=round(seconds, 3),
            pickup_s=round(t_first - t0, 3),
            lines_per_s=round(lines / seconds),
            mb_per_s=round(lines * size / MB / seconds, 2),
            cpu_s=round(cpu, 2),
            cpu_us_per_line=round(cpu * 1e6 / lines, 2),
            in_kafka=counter.lines - baseline,
        )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        if tool is not None:
            tool.stop()
            result["peak_rss_mb"] = round(tool.peak_rss_mb(), 1)
            result["cpu_total_s"] = round(tool.total_cpu_s(), 2)
        if counter is not None:
            counter.close()
        if not args.keep:
            # Keep the run dir (configs, logs) but drop the hard link to the workload.
            for f in spec.watch.glob("*.log"):
                f.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every selected tool on both line sizes and write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json")
    ap.add_argument("--lines", type=int, default=300_000, help="lines of 200 bytes")
    ap.add_argument("--lines-2k", type=int, default=50_000, help="lines of 2 KB (0: skip)")
    ap.add_argument("--peers", default=",".join(ALL), help=f"comma-separated, of {','.join(ALL)}")
    ap.add_argument("--cpu", type=int, default=1, help="core the tools are pinned to (-1: none)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per tool to ship the file")
    ap.add_argument("--startup-timeout", type=float, default=120, help="seconds per tool to start")
    ap.add_argument("--keep", action="store_true", help="keep workload links in the run dirs")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.cpu < 0 or (os.cpu_count() or 1) <= args.cpu:
        args.cpu = None
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {list(ALL)}")

    variants = [(args.lines, 200)] + ([(args.lines_2k, 2000)] if args.lines_2k > 0 else [])
    files = {}
    for lines, size in variants:
        path = WORK_DIR / "files" / f"lines-{size}B-{lines}.log"
        write_workload(path, lines, size)
        files[size] = path

    results: list[dict[str, Any]] = []
    out: dict[str, Any] = {
        "machine": machine_info(),
        "setup": {
            "kafka_nodes": 3,
            "partitions": 4,
            "replication": 2,
            "acks": "all",
            "compression": "lz4",
            "pinned_cpu": args.cpu,
        },
        "results": results,
    }
    started = time.monotonic()
    with kafka_cluster(WORK_DIR / "kafka-peers", size=3) as cluster:
        bootstrap = cluster.bootstrap  # type: ignore[attr-defined]
        for lines, size in variants:
            for name in names:
                res = run_one(ALL[name], bootstrap, files[size], lines, size, args)
                results.append(res)
                if res["ok"]:
                    print(
                        f"{name:16s} {res['variant']:>5s} {res['lines_per_s']:>9,} lines/s "
                        f"{res['mb_per_s']:7.2f} MB/s cpu {res['cpu_s']:6.2f} s "
                        f"rss {res.get('peak_rss_mb', 0):7.1f} MB",
                        flush=True,
                    )
                else:
                    print(
                        f"{name:16s} {res['variant']:>5s} FAILED: {res['error']}",
                        flush=True,
                    )
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

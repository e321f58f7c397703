"""Peer benchmark: how fast kepler-log's agent and its alternatives move a log file into Kafka.

Every tool ships the same pre-written file (200 B, 2 KB and 20 KB lines) to its own topic on a
3-node local KRaft cluster (RF 2, 4 partitions, acks=all), pinned to one core. Measured over a
steady window (10 s, starting 2 s after the first line reached Kafka): lines/s, MB/s and CPU %
of a core; and peak RSS. Every tool runs --rounds times per size, in alternating order; the
results are the median run with the spread, and the agent's ratio to the best peer per round.
A tool that is missing, crashes or times out is a failed run with the reason; the run goes on.
Usage (details in bench/README.md):

    .venv/bin/python bench/bench_peers.py --out bench/results/peers.json [--rounds 3] [--window-s 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    cpu_by_thread,
    create_topic,
    delete_topic,
    exit_on_sigterm,
    header_lines_below,
    kafka_cluster,
    machine_info,
    make_line,
    read_into_cache,
    settle_writeback,
    thread_cpu,
    write_workload,
)
from peers.tools import AGENT, ALL, Peer, RunSpec

MB = 1_000_000


def _probe(spec: RunSpec, tool: Tool, count: Callable[[], int], size: int, timeout: float) -> int:
    """Wait until a tailing tool has shipped a probe line; return the lines then in Kafka.

    A new probe file is written every 3 s until one arrives: a tool that was still starting
    may have missed the first (some tailers start at the end of files present at start-up).
    """
    import random

    deadline = time.monotonic() + timeout
    written = 0
    next_probe = 0.0
    while count() < 1:
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
    while count() < written and time.monotonic() < settle:
        time.sleep(0.05)
    return count()


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


def _steady(
    count: Callable[[], int | None],
    tool: Tool,
    baseline: int,
    lines: int,
    args: argparse.Namespace,
    fed_at: float,
    interval: float,
) -> dict[str, Any]:
    """Measure one tool's steady state: `args.window_s` seconds starting `args.warmup_s` after
    its first workload line reached Kafka. Lines/s, MB/s and CPU % come from that window only,
    so start-up, JIT and pick-up do not dilute them; the workload file is large enough that
    the fastest tool is still shipping when the window closes (`steady_s` says if it was not).
    `count` returns None when it could not read (the poll is skipped, never taken as 0 lines);
    `interval` is how often it is asked (the agent's metrics page costs it CPU: not too often).
    """
    alive = _watchdog(tool)
    deadline = time.monotonic() + args.timeout
    total = baseline + lines
    first = start = 0.0
    c0 = cpu0 = 0.0
    threads0: dict[str, float] = {}
    while True:
        got = count()
        now = time.monotonic()
        if got is not None:
            n = got
            if n > baseline and not first:
                first = now
            if first and not start and now >= first + args.warmup_s:
                if n >= total:
                    raise RuntimeError(f"the file ran out in the warm-up: raise the line count ({lines:,})")
                start, c0, cpu0 = now, n, tool.sample().cpu_s
                threads0 = thread_cpu(tool.proc.pid) if tool.proc else {}
            if start and (now >= start + args.window_s or n >= total):
                cpu1 = tool.sample().cpu_s
                threads1 = thread_cpu(tool.proc.pid) if tool.proc else {}
                seconds = max(now - start, 1e-6)
                return {
                    "pickup_s": round(first - fed_at, 3),
                    "steady_s": round(seconds, 2),
                    "window_lines": n - c0,
                    "lines_per_s": round((n - c0) / seconds),
                    "cpu_percent": round(100 * (cpu1 - cpu0) / seconds, 1),
                    "cpu_by_thread": cpu_by_thread(threads0, threads1, seconds),
                    "end_count": n,
                }
        if err := alive():
            raise RuntimeError(f"{err} ({(got or baseline) - baseline}/{lines} lines in Kafka)")
        if now > deadline:
            raise TimeoutError(
                f"timeout after {args.timeout:.0f} s: {(got or baseline) - baseline}/{lines} lines"
            )
        time.sleep(interval)


def _check_count(
    bootstrap: str, counter: TopicCounter, claimed: int, count: Callable[[], int | None]
) -> None:
    """The agent's acknowledged-lines count at the window's end against the topic itself.

    Right after the count was read, the partitions' end offsets are taken, then the count is
    read again: the records below those offsets must hold at least the first count (acked
    means in the log) and at most the second plus 1 % (what reached the log but whose ack was
    still on its way). Fails the run otherwise: a miscount either way cannot pass.
    """
    ends = counter.consumer.end_offsets(counter.partitions)
    after = count()
    in_topic = header_lines_below(bootstrap, ends)
    if after is None:
        raise RuntimeError("the agent's metrics page did not answer after the window")
    if not claimed <= in_topic <= after + max(1000, after // 100):
        raise RuntimeError(
            f"the agent counted {claimed:,}-{after:,} acked lines, the topic holds {in_topic:,}"
        )


def run_one(
    peer: Peer,
    bootstrap: str,
    workload: Path,
    lines: int,
    size: int,
    args: argparse.Namespace,
    round_no: int = 0,
) -> dict[str, Any]:
    """Ship `workload` with one tool and measure its steady state; never raises, failures
    become results."""
    variant = f"{size}B" if size < 1000 else f"{size // 1000}KB"
    result: dict[str, Any] = {
        "tool": peer.name,
        "variant": variant,
        "line_bytes": size,
        "round": round_no,
        "ok": False,
        "error": "",
        "version": "",
    }
    if reason := peer.missing():
        result["error"] = reason
        return result
    result["version"] = peer.version()
    workdir = WORK_DIR / "peers" / f"{peer.name}-{variant}-{round_no}"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "watch").mkdir(parents=True)
    topic = f"bench-{peer.name}-{variant}-{round_no}-{int(time.time())}"
    spec = RunSpec(workdir, workdir / "watch", workload, bootstrap, topic, args.cpu)
    tool: Tool | None = None
    counter: TopicCounter | None = None
    try:
        result["settle_s"] = settle_writeback()  # the previous run's topic on its way to disk
        result["cache_s"] = read_into_cache(workload)
        create_topic(bootstrap, topic, partitions=4, replication=2)
        # One line per record: the partitions' end offsets. The agent packs many lines into a
        # record: its own count of lines Kafka acknowledged (acks=all), checked against the
        # topic's kl.lines headers after the run, so a miscount cannot pass unnoticed.
        counter = TopicCounter(bootstrap, topic)
        tool = peer.tool(spec)
        tool.start()
        own = peer.counter(spec)
        count: Callable[[], int | None] = own or counter.count
        if peer.mode == "file":
            baseline, fed_at = 0, tool.started
        else:
            baseline = _probe(spec, tool, lambda: count() or 0, size, args.startup_timeout)
            result["startup_s"] = round(time.monotonic() - tool.started, 2)
            os.link(workload, spec.watch / "app.log")  # appears whole, as a new file
            fed_at = time.monotonic()
        result.update(_steady(count, tool, baseline, lines, args, fed_at, 0.5 if own else 0.05))
        end = result.pop("end_count")
        if own is not None:
            _check_count(bootstrap, counter, end, own)
        result.update(ok=True, mb_per_s=round(result["lines_per_s"] * size / MB, 2))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        if tool is not None:
            tool.stop()
            result["peak_rss_mb"] = round(tool.peak_rss_mb(), 1)
        if counter is not None:
            counter.close()
        for f in spec.watch.glob("*.log"):  # drop the hard link to the workload
            f.unlink(missing_ok=True)
        delete_topic(bootstrap, topic)  # a run writes up to GBs (x2 replicas): free the disk
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], names: list[str], window_s: float) -> tuple[list[dict], list[dict]]:
    """Per tool and line size the median run and the spread; per line size the agent's ratio
    to the best peer, round by round (the rounds alternate the order, so each ratio compares
    runs made minutes apart), as a median and its spread."""
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        of = [r for r in runs if r["variant"] == variant]
        for name in names:
            mine = [r for r in of if r["tool"] == name]
            ok = [r for r in mine if r["ok"]]
            if not ok:
                rows.append(mine[-1] | {"runs": len(mine), "ok_runs": 0})
                continue
            failed = [r for r in mine if not r["ok"]]
            rates = [r["lines_per_s"] for r in ok]
            median = sorted(ok, key=lambda r: r["lines_per_s"])[(len(ok) - 1) // 2]
            rows.append(
                median
                | {
                    "ok": True,
                    "error": f"{len(failed)} run(s) failed: {failed[0]['error']}" if failed else "",
                    "runs": len(mine),
                    "ok_runs": len(ok),
                    "lines_per_s": round(statistics.median(rates)),
                    "lines_per_s_min": min(rates),
                    "lines_per_s_max": max(rates),
                    "lines_per_s_runs": rates,
                    "mb_per_s": round(statistics.median(r["mb_per_s"] for r in ok), 2),
                    "cpu_percent": round(statistics.median(r["cpu_percent"] for r in ok), 1),
                    "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in ok),
                    "notes": ALL[name].notes,
                    # windows cut short: the file ran out before the window closed
                    "short_runs": sum(r["steady_s"] < 0.95 * window_s for r in ok),
                }
            )
        # A round counts only if the agent and every peer that shipped in some round shipped in
        # it: a failed kcat must not make the agent look good against a slower peer.
        # References (kcat with one key) are compared with but never the best peer.
        # The agent in another setting (`ours`) is compared with the same best peer of the round.
        refs = {n for n in names if ALL[n].reference}
        ours = {n for n in names if ALL[n].ours}
        shipping = {r["tool"] for r in of if r["ok"] and r["tool"] != AGENT and r["tool"] not in refs | ours}
        per_round, void = [], []
        vs_ref: dict[str, list[float]] = {}
        vs_best: dict[str, list[float]] = {}
        for rnd in sorted({r["round"] for r in of}):
            got = {r["tool"]: r["lines_per_s"] for r in of if r["round"] == rnd and r["ok"]}
            agent = got.pop(AGENT, None)
            ref_rates = {n: got.pop(n) for n in refs if n in got}
            our_rates = {n: got.pop(n) for n in ours if n in got}
            if agent is None or not got or set(got) != shipping:
                void.append(rnd)
                continue
            best = max(sorted(got), key=lambda t: got[t])
            entry_round = {"round": rnd, "best_peer": best, "ratio": round(agent / got[best], 3)}
            for n, rate in sorted(ref_rates.items()):
                entry_round[f"ratio_to_{n}"] = round(agent / rate, 3)
                vs_ref.setdefault(n, []).append(agent / rate)
            for n, rate in sorted(our_rates.items()):
                entry_round[f"ratio_of_{n}"] = round(rate / got[best], 3)
                vs_best.setdefault(n, []).append(rate / got[best])
            per_round.append(entry_round)
        entry: dict[str, Any] = {"variant": variant, "rounds": per_round, "void_rounds": void}
        entry["references"] = {
            n: {k: round(v, 3) for k, v in _spread(ratios_of_ref).items()}
            for n, ratios_of_ref in vs_ref.items()
        }
        entry["ours"] = {n: {k: round(v, 3) for k, v in _spread(r).items()} for n, r in vs_best.items()}
        if per_round:
            spread = {k: round(v, 3) for k, v in _spread([r["ratio"] for r in per_round]).items()}
            peers = sorted(r["best_peer"] for r in per_round)
            entry |= {"best_peer": max(peers, key=peers.count)} | {f"ratio_{k}": v for k, v in spread.items()}
        else:  # no comparable round: reported, and a missed target, never silently absent
            entry |= {"best_peer": None, "ratio_median": None, "ratio_min": None, "ratio_max": None}
        ratios.append(entry)
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    """Run every selected tool on every line size, `--rounds` times in alternating order, and
    write the JSON results (every run, the medians with their spread, the ratios)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json")
    # Each file outlasts the warm-up and the window of the fastest tool seen here (kcat: up to
    # 1.16 M lines/s at 200 B, 171 k at 2 KB, 18 k at 20 KB; 12 s = 14 M / 2.1 M / 216 k lines):
    # a file that runs out cuts the window short, and a short window is a noisy one.
    ap.add_argument("--lines", type=int, default=16_000_000, help="lines of 200 bytes (0: skip)")
    ap.add_argument("--lines-2k", type=int, default=3_000_000, help="lines of 2 KB (0: skip)")
    ap.add_argument("--lines-20k", type=int, default=300_000, help="lines of 20 KB (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tool and size, order alternating")
    ap.add_argument("--window-s", type=float, default=10, help="seconds of steady shipping measured")
    ap.add_argument("--warmup-s", type=float, default=2, help="seconds after the first line before it")
    ap.add_argument(
        "--warmup-runs", type=int, default=1, help="unmeasured runs per line size before its rounds"
    )
    ap.add_argument("--peers", default=",".join(ALL), help=f"comma-separated, of {','.join(ALL)}")
    ap.add_argument("--cpu", type=int, default=1, help="core the tools are pinned to (-1: none)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per tool to ship the file")
    ap.add_argument("--startup-timeout", type=float, default=120, help="seconds per tool to start")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.cpu < 0 or (os.cpu_count() or 1) <= args.cpu:
        args.cpu = None
    if args.rounds < 1 or args.window_s <= 0 or args.warmup_s < 0 or args.warmup_runs < 0:
        ap.error("--rounds must be >= 1, --window-s > 0, --warmup-s and --warmup-runs >= 0")
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {list(ALL)}")

    sizes = ((args.lines, 200), (args.lines_2k, 2000), (args.lines_20k, 20000))
    variants = [(lines, size) for lines, size in sizes if lines > 0]
    files = {}
    for lines, size in variants:
        path = WORK_DIR / "files" / f"lines-{size}B-{lines}.log"
        write_workload(path, lines, size)
        files[size] = path

    runs: list[dict[str, Any]] = []
    out: dict[str, Any] = {
        "machine": machine_info(),
        "setup": {
            "kafka_nodes": 3,
            "partitions": 4,
            "replication": 2,
            "acks": "all",
            "compression": "lz4",
            "pinned_cpu": args.cpu,
            "rounds": args.rounds,
            "window_s": args.window_s,
            "warmup_s": args.warmup_s,
            "warmup_runs": args.warmup_runs,
            "lines": {f"{size}B": lines for lines, size in variants},
        },
    }
    print(f"wrote the workloads; {settle_writeback()} s until they were on disk", flush=True)
    started = time.monotonic()
    # A deleted topic's files go at once (default: a minute later), and their pages not yet
    # written with them, instead of being written back during the next tool's run.
    with kafka_cluster(WORK_DIR / "kafka-peers", size=3, settings=("file.delete.delay.ms=0",)) as cluster:
        bootstrap = cluster.bootstrap  # type: ignore[attr-defined]
        for lines, size in variants:
            # The first runs on a fresh cluster shipped 30-50 % below the later ones, every tool
            # alike, with the workload cached and nothing to write back (the brokers warming up):
            # not measured.
            for n in range(args.warmup_runs):
                res = run_one(ALL[names[n % len(names)]], bootstrap, files[size], lines, size, args, -1 - n)
                out.setdefault("warmup", []).append(res)
                print(
                    f"warm-up: {res['tool']} {res['variant']} {res.get('mb_per_s', res['error'])} MB/s",
                    flush=True,
                )
            for rnd in range(args.rounds):
                for name in names if rnd % 2 == 0 else names[::-1]:  # A B C D, D C B A, ...
                    res = run_one(ALL[name], bootstrap, files[size], lines, size, args, rnd)
                    runs.append(res)
                    if res["ok"]:
                        print(
                            f"{name:16s} {res['variant']:>5s} round {rnd} {res['lines_per_s']:>9,} lines/s "
                            f"{res['mb_per_s']:7.2f} MB/s cpu {res['cpu_percent']:5.1f} % "
                            f"rss {res.get('peak_rss_mb', 0):7.1f} MB ({res['steady_s']} s steady)",
                            flush=True,
                        )
                    else:
                        print(
                            f"{name:16s} {res['variant']:>5s} round {rnd} FAILED: {res['error']}", flush=True
                        )
    out["results"], out["ratios"] = summarize(runs, names, args.window_s)
    out["runs"] = runs
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    for r in out["ratios"]:
        print(
            f"{r['variant']}: agent / {r['best_peer']} = {r['ratio_median']} ({r['ratio_min']}-{r['ratio_max']}), "
            f"void rounds {r['void_rounds']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

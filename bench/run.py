"""`make bench`: run every benchmark, merge the figures, write tables, charts and the README.

Order: agent bench, consumer bench, peers, the agent's profile, latency and the rest (PARTS).
Each runs as its own subprocess with a time limit, so one broken or hung part is reported and
the rest still runs. Outputs:
bench/results/{results.json,results.md,throughput.png,latency.png} and the block between
`<!-- bench:start -->` and `<!-- bench:end -->` in README.md (nothing else there is touched).

    .venv/bin/python bench/run.py [--only peers,latency] [--quick] [--readme README.md]

`--only` reruns some parts and merges them with the other parts' last JSON. `--quick` runs
small workloads (a smoke test, not figures to publish).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peers.harness import RESULTS_DIR, WORK_DIR, machine_info  # bench/ is sys.path[0]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass
class Part:
    """One benchmark script and how to call it."""

    name: str
    script: str
    timeout: float
    args: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        """The JSON the part writes."""
        return RESULTS_DIR / f"{self.name}.json"


PARTS = [
    Part("agent", "bench_agent.py", 1800, quick=["--lines", "100000"]),
    # three alternating consumer / kcat runs: medians and their spread, not one sample; 4 GB so
    # that each run is about 10 s of steady work, not a second or two
    Part(
        "consumer",
        "bench_consumer.py",
        2400,
        args=["--runs", "3", "--mb", "4096", "--netfix-ab", "--librdkafka", "--two-processes", "--profile"],
        quick=["--runs", "1", "--mb", "100"],
    ),
    Part(
        "peers",
        "bench_peers.py",
        3600,
        quick=[
            *("--lines", "600000", "--lines-2k", "100000", "--lines-20k", "10000"),
            *("--rounds", "1", "--window-s", "2", "--warmup-s", "0.5", "--warmup-runs", "0"),
        ],
    ),
    # where the agent's CPU goes at 2 KB lines: perf over every thread, kernel included
    Part("profile", "bench_profile.py", 1200, quick=["--seconds", "3"]),
    Part("latency", "bench_latency.py", 2400, quick=["--duration", "5", "--rounds", "1", "--warmup-s", "3"]),
    # the same with the agent's fixed read wait (limits.read_coalesce_lines: 0, the default
    # until 2026-12-05): what the rate-paced default saves in delay and costs in CPU
    Part(
        "latency-fixed",
        "bench_latency.py",
        2400,
        args=["--read-coalesce-lines", "0"],
        quick=["--duration", "5", "--rounds", "1", "--warmup-s", "3"],
    ),
    # the same with the consumer's librdkafka client (consumer/rdclient.py): what it does to delay
    Part(
        "latency-rdconsumer",
        "bench_latency.py",
        2400,
        args=["--consumer-client", "librdkafka"],
        quick=["--duration", "5", "--rounds", "1", "--warmup-s", "3"],
    ),
    Part("files", "bench_files.py", 1200, quick=["--sizes", "100,1000", "--seconds", "5"]),
    # TLS + SCRAM against plaintext on the same broker, alternating: the ratio is what matters
    Part("security", "bench_security.py", 1800, quick=["--lines", "50000", "--mb", "64", "--runs", "1"]),
    # 300 agents' worth of records (30 services, 100 B-50 KB lines, bursts), 1 and 2 consumers
    Part("fleet", "bench_fleet.py", 2400, quick=["--quick"]),
    # Kafka gone for 30 minutes under load (150 s, past the client timeouts, with --quick)
    Part("outage", "bench_outage.py", 3000, quick=["--outage-s", "150"]),
    # the agent's producer client against librdkafka: CPU at a trickle, one partition's MB/s
    Part(
        "clients", "bench_clients.py", 1500, quick=["--rounds", "1", "--trickle-s", "5", "--partition-s", "5"]
    ),
    # what the completeness audit's watermarks cost the agent: 1,000 files, on vs off, alternating
    Part(
        "watermarks",
        "bench_agent.py",
        1800,
        args=["--watermark-cost"],
        quick=["--watermark-runs", "1", "--watermark-files", "100", "--watermark-seconds", "20"],
    ),
]

LATENCY_P50_TARGET_MS, LATENCY_P99_TARGET_MS = 50, 250  # end to end, at 1k, 10k and 50k lines/s
WATERMARK_COST_TARGET = 0.2  # % of one core: "next to nothing", the same bound as the metrics


def run_part(part: Part, quick: bool) -> dict[str, Any]:
    """Run one part; its output is shown live and kept in bench/work/logs/<part>.log."""
    script = BENCH / part.script
    entry: dict[str, Any] = {"script": f"bench/{part.script}", "ok": False, "error": ""}
    if not script.exists():
        entry["error"] = f"bench/{part.script} does not exist yet"
        print(f"== {part.name}: skipped, {entry['error']}", flush=True)
        return entry
    part.out.unlink(missing_ok=True)  # a stale JSON must not pass for this run's
    cmd = [sys.executable, str(script), "--out", str(part.out), *part.args]
    if quick:
        cmd += part.quick
    log_path = WORK_DIR / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {part.name}: {' '.join(cmd[1:])} (limit {part.timeout:.0f} s)", flush=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a timeout signals the part and all its tools
        )
        pump = threading.Thread(target=_tee, args=(proc, log), daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(part.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        pump.join(10)
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["returncode"] = proc.returncode
    if part.out.exists():
        try:
            entry["data"] = json.loads(part.out.read_text())
        except json.JSONDecodeError as exc:
            entry["error"] = f"{part.out.name} is not JSON: {exc}"
    if timed_out:
        entry["error"] = f"timed out after {part.timeout:.0f} s"
    elif proc.returncode != 0 and not entry["error"]:
        tail = " ".join(log_path.read_text(errors="replace")[-300:].split())
        entry["error"] = f"exit code {proc.returncode}: {tail}"
    elif "data" not in entry and not entry["error"]:
        entry["error"] = f"wrote no {part.out.name}"
    entry["ok"] = not entry["error"]
    entry["rerun"] = True
    entry["measured"] = _now()
    state = "ok" if entry["ok"] else f"FAILED ({entry['error'][:200]})"
    print(f"== {part.name}: {state} in {entry['seconds']} s", flush=True)
    return entry


def _tee(proc: subprocess.Popen[str], log: TextIO) -> None:
    """Show the part's output live and keep it in its log."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the part's process group, then SIGKILL.

    The parts turn SIGTERM into SystemExit (peers.harness.exit_on_sigterm), so their cleanup
    stops the tools and the Kafka brokers, which run in sessions of their own.
    """
    for sig, grace in ((signal.SIGTERM, 120), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def previous(part: Part, last: dict[str, Any], render: bool = False) -> dict[str, Any]:
    """The part's last JSON, for parts not rerun (--only, --render): labelled with the date of
    the run that measured it (from the last results.json), never with this run's. `render`
    shows the last run again as it was: its own parts are not "from an earlier run"."""
    last_part = last.get("parts", {}).get(part.name) or {}
    entry: dict[str, Any] = {
        "script": f"bench/{part.script}",
        "ok": False,
        "rerun": render and bool(last_part.get("rerun")),
        "measured": (last.get("parts", {}).get(part.name) or {}).get("measured") or "an unknown date",
    }
    if part.out.exists():
        entry["data"] = json.loads(part.out.read_text())
        entry["ok"] = True
        # written by a run after the last results.json (two `--only` runs at once): its own date
        own = str((entry["data"].get("machine") or {}).get("date") or "")
        if own > str(last_part.get("measured") or ""):
            entry["measured"] = own
    else:
        entry["error"] = "not run"
    return entry


def _when(part: dict[str, Any]) -> str:
    """' (measured DATE)', marked when the figures come from an earlier run than this one."""
    if not part:
        return ""
    if part.get("rerun"):
        return f" (measured {part.get('measured')})"
    return f" (**from an earlier run**, measured {part.get('measured')})"


# --- Markdown ---------------------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _rows_of(data: Any) -> list[dict[str, Any]]:
    """The result rows of a part's JSON, whatever its exact shape."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("results", "runs", "rows"):
            if isinstance(data.get(key), list):
                return _rows_of(data[key])
        return [data]
    return []


def _pick(row: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _spread_text(r: dict[str, Any]) -> str:
    lo, hi = r.get("lines_per_s_min"), r.get("lines_per_s_max")
    base = _num(r.get("lines_per_s"))
    return base if lo is None or hi is None or r.get("ok_runs", 1) < 2 else f"{base} ({_num(lo)}–{_num(hi)})"


def throughput_table(merged: dict[str, Any]) -> list[str]:
    """Tool | lines/s median (spread) | MB/s | CPU % | peak RSS MB | notes, for the peers and the agent."""
    rows: list[list[str]] = []
    peers = merged["parts"].get("peers", {})
    for r in _rows_of(peers.get("data")):
        tool = f"{r.get('tool', '?')} ({r.get('variant', '')})"
        if r.get("ok"):
            note = r.get("notes", "") + (f" ({r['error']})" if r.get("error") else "")
            if r.get("short_runs"):
                note += f" ({r['short_runs']} of {r.get('ok_runs')} windows cut short: the file ran out)"
            rows.append([tool, _spread_text(r), _num(r.get("mb_per_s"), 1),
                         _num(r.get("cpu_percent"), 0), _threads_text(r.get("cpu_by_thread")),
                         _num(r.get("peak_rss_mb"), 0), note])  # fmt: skip
        else:
            rows.append([tool, "failed", "–", "–", "–", "–", str(r.get("error", ""))[:160]])
    if not peers.get("ok") and not rows:
        rows.append(["peers", "failed", "–", "–", "–", "–", str(peers.get("error", ""))[:160]])
    agent = merged["parts"].get("agent", {})
    data = agent.get("data") or {}
    tp = data.get("throughput") if isinstance(data, dict) else None
    if isinstance(tp, dict):
        lines, rate, cpu_s = tp.get("lines"), _pick(tp, "lines_per_s"), _pick(tp, "agent_cpu_s", "cpu_s")
        cpu = 100 * cpu_s * rate / lines if lines and rate and cpu_s is not None else None
        rows.append([
            "keplerlog-agent (bench_agent, 200B)",
            _num(rate),
            _num(_pick(tp, "mb_per_s"), 1),
            _num(cpu, 0),
            "–",
            _num(_pick(tp, "peak_rss_mb", "rss_mb"), 0),
            f"bench/bench_agent.py, {_num(lines)} lines, start to end, own setup (see below)"
            + ("" if agent.get("rerun") else f"; from an earlier run, measured {agent.get('measured')}"),
        ])  # fmt: skip
    if not agent.get("ok"):
        rows.append(["keplerlog-agent (bench_agent)", "failed", "–", "–", "–", "–",
                     str(agent.get("error", ""))[:160]])  # fmt: skip
    header = [
        "tool (line size)",
        "lines/s: median (min–max)",
        "MB/s",
        "CPU % of a core",
        "of which, by thread",
        "peak RSS MB",
        "notes",
    ]
    return _table(header, rows)


def _threads_text(split: Any) -> str:
    """`cpu_by_thread` as 'name N, name N' (the window's % of a core per thread group)."""
    if not isinstance(split, dict) or not split:
        return "–"  # a run from before the split was measured
    shown = [f"{name} {_num(pct, 0)}" for name, pct in split.items() if pct >= 0.5]  # idle: left out
    return ", ".join(shown) or "–"


PEER_RATIO_TARGET = 1.0  # the agent at least as fast as the best peer, on every line size


def peer_ratios(data: Any) -> list[dict[str, Any]]:
    """bench_peers.py's per-line-size ratios of the agent to the best peer."""
    ratios = data.get("ratios") if isinstance(data, dict) else None
    return [r for r in ratios or [] if isinstance(r, dict)]


def _ratio_list(ratios: dict[str, Any] | None, label: str) -> str:
    """Named ratios as 'median (min–max)' plus `label` with the name in it; '–' when none ran."""
    return (
        "; ".join(
            f"{_num(v.get('median'), 2)} ({_num(v.get('min'), 2)}–{_num(v.get('max'), 2)})"
            + label.format(name=name)
            for name, v in sorted((ratios or {}).items())
            if isinstance(v, dict)
        )
        or "–"
    )


def _reference_ratios(ratio: dict[str, Any]) -> str:
    """The agent over each reference run (not a peer)."""
    return _ratio_list(ratio.get("references"), " vs {name}")


def _ours_ratios(ratio: dict[str, Any]) -> str:
    """The agent in another setting (its other Kafka client) over the best peer."""
    return _ratio_list(ratio.get("ours"), " ({name})")


def ratio_table(part: dict[str, Any]) -> list[str]:
    """Per line size: the agent's lines/s over the best peer's, round by round."""
    data = part.get("data")
    ratios = peer_ratios(data)
    if not ratios:
        return []
    setup = data.get("setup", {}) if isinstance(data, dict) else {}
    rows = [
        [
            str(r.get("variant") or "?"),
            str(r.get("best_peer") or "–"),
            f"{_num(r.get('ratio_median'), 2)} ({_num(r.get('ratio_min'), 2)}–{_num(r.get('ratio_max'), 2)})",
            ", ".join(f"{x.get('ratio', 0):.2f} vs {x.get('best_peer')}" for x in r.get("rounds", []))
            + (f"; rounds {r['void_rounds']} void (a tool failed)" if r.get("void_rounds") else ""),
            f">= {PEER_RATIO_TARGET}",
            "met" if (r.get("ratio_median") or 0) >= PEER_RATIO_TARGET else "**missed**",
            _ours_ratios(r),
            _reference_ratios(r),
        ]
        for r in ratios
    ]
    lines = _table(
        [
            "line size",
            "best peer",
            "agent / best peer: median (min–max)",
            "per round",
            "target",
            "met",
            "the agent's other client / best peer",
            "agent / reference (one partition, as the agent)",
        ],
        rows,
    )
    lines += [
        "",
        f"{setup.get('rounds', '?')} rounds, the order of the tools reversed every round"
        f"{_warmup_label(setup.get('warmup_runs'))}; each run measures "
        f"{_num(setup.get('window_s'))} s of steady shipping starting {_num(setup.get('warmup_s'))} s after "
        "its first line reached Kafka (lines/s and CPU from that window only). The ratio is taken per round, "
        'against the best peer of that round. "Of which, by thread": the same window\'s CPU per thread '
        "(/proc/PID/task, numbered threads summed, idle ones left out: rdk:broker is librdkafka's broker "
        "threads, which compress and send; keplerlog-agent is the agent's interpreter threads, which read, "
        "cut records and hand them to the client; the four busiest groups, then other).",
    ]
    return lines


def _le(v: Any, limit: float) -> bool | None:
    return None if v is None else float(v) <= limit


def _ge(v: Any, limit: float) -> bool | None:
    return None if v is None else float(v) >= limit


def _warmup_label(runs: object) -> str:
    """How many unmeasured runs came before each line size's rounds (older JSON: not said)."""
    if not isinstance(runs, int):
        return ""
    return f", after {runs} unmeasured warm-up run{'s' if runs != 1 else ''} per line size" if runs else ""


def _cpu_runs_label(cpu: dict[str, Any]) -> str:
    """The label's tail ", median of N runs (min–max)" for a median (older results had one run)."""
    runs, sp = cpu.get("runs"), (cpu.get("cpu_percent") or {}).get("spread")
    return f", median of {runs} runs ({sp[0]}–{sp[1]})" if runs and sp else ""


def agent_checks(data: dict[str, Any]) -> list[tuple[str, Any, str, bool | None, int]]:
    """(measure, value, target, met, digits) of bench_agent.py's figures."""
    tp = data.get("throughput") or {}
    cpu = data.get("cpu_200_lines_s") or {}
    lat = data.get("latency_10k_lines_s") or {}
    mc = data.get("metrics_cost_200_lines_s") or {}
    rss_cost = None if "rss_mb_cost" not in mc else round(mc["rss_mb_cost"], 1)
    at15, at1 = mc.get("cpu_percent_cost_at_15s_scrape"), mc.get("cpu_percent_cost_at_1s_scrape")
    client = data.get("client", "kafka-python")  # runs before the key existed used the package's default
    return [
        (f"lines/s, 200 B lines, one core, 3 brokers, acks=all (defaults, kafka.client {client})",
         tp.get("lines_per_s"),
         ">= 100,000", _ge(tp.get("lines_per_s"), 100_000), 0),
        ("peak RSS during that run (MB)", tp.get("peak_rss_mb"), "<= 40", _le(tp.get("peak_rss_mb"), 40), 1),
        (f"CPU at a steady 200 lines/s (% of one core){_cpu_runs_label(cpu)}", cpu.get("cpu_percent_of_one_core"), "<= 1",
         _le(cpu.get("cpu_percent_of_one_core"), 1), 2),
        ("RSS at 200 lines/s (MB)", cpu.get("rss_mb"), "<= 40", _le(cpu.get("rss_mb"), 40), 1),
        ("p99 write → readable in Kafka at 10k lines/s (s)", lat.get("p99_s"), "<= 0.5",
         _le(lat.get("p99_s"), 0.5), 3),
        ("metrics, prometheus_client - the hand-written page before it: CPU at 200 lines/s scraped "
         "every 15 s (% of one core)", at15, "<= 0.2", _le(at15, 0.2), 4),
        ("the same, scraped every 1 s (% of one core)", at1, "<= 0.2", _le(at1, 0.2), 3),
        ("the same, RSS at 200 lines/s (MB, median after - before)", rss_cost, "<= 2", _le(rss_cost, 2), 1),
    ]  # fmt: skip


CONSUMER_KCAT_TARGET = 0.8  # while fsyncing before each commit and routing into day files


def kcat_ratio(data: dict[str, Any], member: str) -> tuple[float, float, float] | None:
    """A consumer's MB/s over kcat's: median (min, max) of the rounds' ratios, None if unknown.

    The tools alternate within a round, so each round's ratio compares them on the same
    machine state (as the peers part does); a single run gives one ratio of its two figures.
    """
    runs = data.get("runs") or {}
    mine, kcat = runs.get(f"{member}_mb_s") or [], runs.get("kcat_mb_s") or []
    if len(mine) == len(kcat) >= 2 and all(kcat) and all(mine):
        ratios = [m / k for m, k in zip(mine, kcat, strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)
    one, k = (data.get(member) or {}).get("mb_s"), (data.get("kcat") or {}).get("mb_s")
    return (one / k,) * 3 if one and k else None


def consumer_checks(data: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """(target, met) of bench_consumer.py's figures: >= 100 MB/s and >= 0.8x kcat -C (issue 12)."""
    mine = (data.get("consumer") or {}).get("mb_s")
    ratio = kcat_ratio(data, "consumer")
    out = [
        (">= 100 MB/s", _ge(mine, 100)),
        (
            f">= {CONSUMER_KCAT_TARGET}x kcat -C to a file with kafka.client kafka-python (the package's default)",
            None if ratio is None else ratio[0] >= CONSUMER_KCAT_TARGET,
        ),
    ]
    if (data.get("consumer_librdkafka") or {}).get("mb_s"):
        rd = kcat_ratio(data, "consumer_librdkafka")
        out.append((
            f">= {CONSUMER_KCAT_TARGET}x kcat -C with kafka.client librdkafka (the consumer role's default)",
            None if rd is None else rd[0] >= CONSUMER_KCAT_TARGET,
        ))  # fmt: skip
    return out


def missed_targets(merged: dict[str, Any]) -> list[str]:
    """Every target a part shown in this result missed (stale parts are marked as such)."""
    out: list[str] = []
    for name, part in merged["parts"].items():
        data = part.get("data")
        if not isinstance(data, dict):
            continue
        stale = "" if part.get("rerun") else " (from an earlier run)"
        if name == "agent":
            out += [f"agent: {m} {t}{stale}" for m, _, t, ok, _ in agent_checks(data) if ok is False]
        elif name == "watermarks":
            cost = (data.get("watermark_cost_200_lines_s") or {}).get("cpu_percent_cost")
            if _le(cost, WATERMARK_COST_TARGET) is False:
                out.append(f"watermarks: CPU cost <= {WATERMARK_COST_TARGET} % of one core{stale}")
        elif name == "files":
            targets = data.get("targets", {})
            out += [
                f"files: {key} <= {targets.get(key)}{stale}"
                for key, ok in (data.get("met") or {}).items()
                if not ok
            ]
        elif name == "peers":
            out += [
                f"peers: agent / best peer >= {PEER_RATIO_TARGET} at {r.get('variant')}{stale}"
                for r in peer_ratios(data)
                if (r.get("ratio_median") or 0) < PEER_RATIO_TARGET
            ]
        elif name == "outage":
            out += [f"outage: {m}{stale}" for m in data.get("missed", [])]
        elif name == "consumer" and "consumer" in data:
            out += [f"consumer: {t}{stale}" for t, ok in consumer_checks(data) if ok is False]
        elif name == "latency":  # at defaults (latency-fixed is the comparison)
            for r in data.get("results", []):
                for key, target in (("p50_ms", LATENCY_P50_TARGET_MS), ("p99_ms", LATENCY_P99_TARGET_MS)):
                    if _le(_worst(r, key), target) is False:
                        out.append(
                            f"latency: {key[:3]} <= {target} ms at {_num(r.get('rate'))} lines/s"
                            f" in every round{stale}"
                        )
    return out


def agent_sections(part: dict[str, Any]) -> list[str]:
    """bench_agent.py's figures against the agent's targets (issue: ≥100k lines/s on one core,
    ≤40 MB RSS, ≤2 % of a core at 200 lines/s, p99 ≤ 0.5 s at 10k lines/s)."""
    data = part.get("data")
    if not isinstance(data, dict):
        return [f"_agent: failed — {part.get('error', '')}_"]
    big = data.get("throughput_16mib_buffer") or {}

    def row(name: str, value: Any, target: str, ok: bool | None, digits: int = 0) -> list[str]:
        verdict = "–" if ok is None or value is None else ("yes" if ok else "**no**")
        return [name, _num(value, digits), target, verdict]

    rows = [row(name, value, target, ok, digits) for name, value, target, ok, digits in agent_checks(data)]
    if big:
        rows.append(row("lines/s with a 16 MiB buffer (comparison)", big.get("lines_per_s"), "–", None))
        rows.append(row("peak RSS with a 16 MiB buffer (MB)", big.get("peak_rss_mb"), "–", None, 1))
    out = _table(["measure", "value", "target", "met"], rows)
    out += metrics_ab(data.get("metrics_cost_200_lines_s") or {})
    out += client_ab(data.get("client_ab") or {})
    if not part.get("ok"):
        out.append(f"\n_agent: {part.get('error', '')}_")
    return out


def _median_fig(m: dict[str, Any], digits: int) -> str:
    """A bench_agent.py spread ({median, spread: [min, max]}) as 'median (min–max)'."""
    lo, hi = m["spread"]
    return f"{m['median']:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def metrics_ab(mc: dict[str, Any]) -> list[str]:
    """The metrics rows' A/B: the agent of git rev `before_rev` (hand-written page) against this one."""
    if "before" not in mc or "after" not in mc:
        return []

    def fig(side: str, key: str, digits: int) -> str:
        return _median_fig(mc[side][key], digits)

    rows = [
        [
            "CPU at 200 lines/s, scraped every 1 s (% of one core)",
            fig("before", "cpu_percent", 2),
            fig("after", "cpu_percent", 2),
        ],
        ["CPU per scrape (ms)", fig("before", "scrape_cpu_ms", 3), fig("after", "scrape_cpu_ms", 3)],
        ["RSS at 200 lines/s (MB)", fig("before", "rss_mb", 1), fig("after", "rss_mb", 1)],
    ]
    return [
        "",
        f"Metrics A/B: the agent of `{mc.get('before_rev')}` (its hand-written Prometheus page) and this "
        f"one (prometheus_client's registry and OpenMetrics writer behind `metrics_http`'s own server), {mc.get('runs')} runs each, alternating; median (min–max). The "
        "cost at a scrape interval is the CPU per scrape divided by the interval.",
        "",
        *_table(["measure", "hand-written page", "prometheus_client + metrics_http"], rows),
    ]


def client_ab(ab: dict[str, Any]) -> list[str]:
    """The agent with kafka-python (the package's default client) against itself with librdkafka."""
    clients = [c for c in ("kafka-python", "librdkafka") if isinstance(ab.get(c), dict)]
    if len(clients) < 2:
        return []

    rows = [
        [label, *(_median_fig(ab[c][key], digits) for c in clients)]
        for label, key, digits in (
            ("CPU at a steady 200 lines/s (% of one core; target <= 1)", "cpu_percent", 2),
            ("RSS at 200 lines/s (MB)", "rss_mb", 1),
            (f"lines/s shipping {_num(ab.get('lines'))} lines of 200 B", "lines_per_s", 0),
            ("peak RSS during that run (MB; target <= 40)", "peak_rss_mb", 1),
        )
    ]
    return [
        "",
        f"Producer client A/B (`kafka.client`): the same agent with kafka-python (the package's default) "
        f"and with librdkafka (the service image's), {ab.get('runs')} rounds, alternating; median (min–max).",
        "",
        *_table(["measure", *clients], rows),
    ]


def files_table(part: dict[str, Any]) -> list[str]:
    """bench_files.py: the agent with many idle files and one active one."""
    data = part.get("data")
    if not isinstance(data, dict):
        return [f"_files: failed — {part.get('error', '')}_"]
    t = data.get("targets", {})
    rows = [
        [
            _num(r.get("files")),
            _num(r.get("idle_cpu_percent"), 2),
            _num(r.get("cpu_percent_with_200_lines_s"), 2),
            _num(r.get("rss_mb"), 1),
            f"{_num(r.get('new_file_delay_s_median'), 3)} / {_num(r.get('new_file_delay_s_max'), 3)}",
            f"{_num(r.get('files_open'))} of {_num(r.get('files_open_limit'))}",
        ]
        for r in data.get("rows", [])
    ]
    out = _table(
        ["idle files", "idle CPU %", "CPU % with 200 lines/s", "RSS MB", "new file → Kafka s (median / max)",
         "open files"],
        rows,
    )  # fmt: skip
    met = data.get("met", {})
    last = (data.get("rows") or [{}])[-1]
    out.append("")
    out.append(
        f"Idle CPU over {_num(last.get('idle_seconds') or last.get('seconds'))} s (whole periods of the "
        f"agent's safety-net rescan), the rest over {_num(last.get('seconds'))} s. "
        "Targets: idle CPU ≤ {} % of a core at the largest size ({}), RSS ≤ {} MB ({}), new-file delay ≤ {} s ({}).".format(
            t.get("idle_cpu_percent"),
            "met" if met.get("idle_cpu_percent") else "**missed**",
            t.get("rss_mb"),
            "met" if met.get("rss_mb") else "**missed**",
            t.get("new_file_delay_s"),
            "met" if met.get("new_file_delay_s") else "**missed**",
        )
    )
    return out


def outage_table(part: dict[str, Any]) -> list[str]:
    """bench_outage.py: one long broker outage under load."""
    data = part.get("data")
    if not isinstance(data, dict):
        return [f"_outage: failed — {part.get('error', '')}_"]
    rss = data.get("rss_mb", {})
    t = data.get("targets", {})
    rows = [
        ["lines written (all through the outage)", _num(data.get("lines_written")), "–"],
        ["lost / duplicated in the topic", f"{_num(data.get('lost'))} / {_num(data.get('duplicated'))}", "0 / 0"],
        ["agent restarted", "yes" if data.get("restarted") else "no", "no"],
        ["first ack after the broker was ready (s)", _num(data.get("resume_s"), 2), f"≤ {t.get('resume_s')}"],
        ["backlog at the restart (MB)", _num((data.get("backlog_bytes_at_restart") or 0) / 1e6, 1), "–"],
        ["backlog acknowledged after the broker was ready (s)", _num(data.get("caught_up_s"), 1), "–"],
        [
            "RSS before / peak / median of the 2nd half / after (MB)",
            " / ".join(_num(rss.get(k), 1) for k in ("before", "peak", "median_second_half", "end")),
            f"peak ≤ {t.get('rss_mb')}",
        ],
        [
            "peak bytes in flight / buffer cap",
            f"{_num(data.get('peak_inflight_bytes'))} / {_num(data.get('buffer_cap_bytes'))}",
            "≤ cap",
        ],
        ["samples paused for memory / seeing a broker", f"{data.get('paused_share', 0):.0%} / "
         f"{data.get('connected_share', 0):.0%}", "–"],
        ["agent CPU during the outage (% of one core)", _num(data.get("cpu_percent_outage"), 2), "–"],
    ]  # fmt: skip
    out = [
        f"Kafka (one broker, `kill -9`) away for {_num(data.get('outage_s'))} s while the application "
        f"writes {_num(data.get('rate_lines_s'))} lines/s of {_num(data.get('line_bytes'))} B; the agent "
        f"at its defaults, Kafka client {data.get('agent_client', 'kafka-python')}. "
        "Reproduce: `" + str(data.get("command", "")) + "`.",
        "",
        *_table(["measure", "value", "target"], rows),
    ]
    return out


def _med(summary: dict[str, Any] | None, digits: int = 0, scale: float = 1.0) -> str:
    """'median (min–max)' of a bench summary {median, spread}, or '–'."""
    if not summary or summary.get("median") is None:
        return "–"
    lo, hi = summary["spread"]
    m = _num(summary["median"] * scale, digits)
    return m if lo == hi else f"{m} ({_num(lo * scale, digits)}–{_num(hi * scale, digits)})"


def fleet_table(part: dict[str, Any]) -> list[str]:
    """bench_fleet.py: the consumers under a fleet-shaped load, one process and two."""
    data = part.get("data")
    if not isinstance(data, dict):
        return [f"_fleet: failed — {part.get('error', '')}_"]
    f = data.get("fleet", {})
    rates = data.get("params", {}).get("rates_mb_s", {})
    rows = []
    for count in (1, 2):
        c = data.get(f"consumers_{count}") or {}
        for name, target in rates.items():
            r = c.get(name) or {}
            rows.append([
                f"{count}", f"{name} ({target} MB/s)", _med(r.get("offered_mb_s"), 1),
                _med(r.get("p50_ms")), _med(r.get("p99_ms")), _med(r.get("consumer_cpu_percent")),
                _med(r.get("consumer_peak_rss_mb")), _med(r.get("open_day_files_max")),
                _med(r.get("state_bytes"), 0, 1 / 1000), _med(r.get("lag_records_at_stop")),
            ])  # fmt: skip
        m = c.get("max") or {}
        rows.append([
            f"{count}", "max: drain a backlog", f"{_med(m.get('mb_s'), 1)} consumed", "–", "–", "–",
            _med(m.get("consumer_peak_rss_mb")), "–", _med(m.get("state_bytes"), 0, 1 / 1000), "–",
        ])  # fmt: skip
    header = ["consumers", "phase", "MB/s", "p50 ms", "p99 ms", "CPU % (all)", "peak RSS MB",
              "day files open", "dedup state kB", "lag at stop (records)"]  # fmt: skip
    return [
        f"{_num(f.get('hosts'))} agents, {_num(f.get('services'))} services, {_num(f.get('modules'))} modules "
        f"(Zipf volumes), lines {_num(f.get('mean_line_bytes'))} B on average (p50 / p99 / max "
        f"{' / '.join(_num(x) for x in f.get('line_bytes_p50_p99_max', []))} B), bursts of 5× by a tenth "
        "of the agents each second; 3 brokers, 4 partitions, RF 2, acks=all, lz4. Delay: the broker's "
        "append (LogAppendTime) to the consumer's commit after fsync, seen by polling the group's "
        f"offsets every {_num(data.get('params', {}).get('poll_ms'))} ms. Median (min–max) of "
        f"{_num(data.get('params', {}).get('rounds'))} alternating rounds. MB/s of a rate phase is what "
        "the generator achieved (it shares the cores with the brokers and the consumers). "
        f"Reproduce: `{data.get('command', '')}`.",
        "",
        *_table(header, rows),
    ]


def _runs_note(runs: list[float] | None) -> str:
    """'median of N runs (min-max): [...]', or 'one run (no spread)'."""
    if not runs or len(runs) < 2:
        return "one run (no spread)"
    return f"median of {len(runs)} alternating runs, {min(runs)}-{max(runs)}: {runs}"


def consumer_table(part: dict[str, Any]) -> list[str]:
    """keplerlog-consumer vs kcat consuming the same topic to one file vs dd (the disk)."""
    data = part.get("data")
    if not isinstance(data, dict) or "consumer" not in data:
        return [f"_consumer: failed — {part.get('error', '')}_"]
    runs = data.get("runs") or {}
    cons = data.get("consumer") or {}
    kcat = data.get("kcat") or {}
    dd = data.get("dd") or {}
    mine = cons.get("mb_s")

    def cpu(member: dict[str, Any]) -> str:
        """CPU seconds per GB of the median run: the reader's own, and the brokers' meanwhile."""
        per_gb = member.get("cpu_s_per_gb") or {}
        if not per_gb:
            return "–"
        own = sum(v for k, v in per_gb.items() if k != "broker")
        rd = f" (librdkafka threads {_num(per_gb['librdkafka'], 1)})" if per_gb.get("librdkafka") else ""
        return f"{_num(own, 1)}{rd} + {_num(per_gb.get('broker'), 1)}"

    def rss(member: dict[str, Any]) -> str:
        return _num(member.get("peak_rss_mb"), 0) if member.get("peak_rss_mb") else "–"

    rows = [
        ["keplerlog-consumer → day files (fsync, then commit), one process", _num(mine, 1), "1.00",
         cpu(cons), rss(cons), _runs_note(runs.get("consumer_mb_s"))],
        ["kcat -C → one file (no fsync, no commit)", _num(kcat.get("mb_s"), 1),
         _num(kcat["mb_s"] / mine, 2) if mine and kcat.get("mb_s") else "–", cpu(kcat), "–",
         _runs_note(runs.get("kcat_mb_s"))],
        ["dd, sequential write with fdatasync (the disk)", _num(dd.get("mb_s"), 1),
         _num(dd["mb_s"] / mine, 2) if mine and dd.get("mb_s") else "–", "–", "–", ""],
    ]  # fmt: skip
    plain = (data.get("consumer_without_netfix") or {}).get("mb_s")
    if plain:
        rows.insert(1, [
            "keplerlog-consumer without consumer/netfix.py (kafka-python's 4 KiB reads, default switch "
            "interval, two copies of each response's record batches)",
            _num(plain, 1), _num(plain / mine, 2) if mine else "–",
            cpu(data["consumer_without_netfix"]), rss(data["consumer_without_netfix"]), _runs_note(runs.get("consumer_without_netfix_mb_s")),
        ])  # fmt: skip
    rd = (data.get("consumer_librdkafka") or {}).get("mb_s")
    if rd:
        rows.insert(1, [
            "keplerlog-consumer with kafka.client librdkafka (consumer/rdclient.py: fetch and LZ4 in "
            "librdkafka's threads, in C), one process",
            _num(rd, 1), _num(rd / mine, 2) if mine else "–", cpu(data["consumer_librdkafka"]),
            rss(data["consumer_librdkafka"]),
            _runs_note(runs.get("consumer_librdkafka_mb_s")),
        ])  # fmt: skip
    two = (data.get("consumer_two_processes") or {}).get("mb_s")
    if two:
        rows.insert(-2, [
            "keplerlog-consumer, two processes in one group sharing the data root (the partitions "
            "split between them, one interpreter each: a second process, or host, for the consumer)",
            _num(two, 1), _num(two / mine, 2) if mine else "–", cpu(data["consumer_two_processes"]),
            rss(data["consumer_two_processes"]),
            _runs_note(runs.get("consumer_two_processes_mb_s")),
        ])  # fmt: skip
    params = data.get("params") or {}
    out = _table(
        ["writer", "MB/s", "× consumer", "CPU s per GB: own + brokers'", "peak RSS MB", "notes"], rows
    )
    out.append("")
    out.append(
        f"{params.get('mb', '?')} MB of {params.get('line_bytes', '?')}-byte lines in "
        f"{params.get('record_kb', '?')} KB records, {params.get('modules', '?')} modules, "
        f"{params.get('partitions', '?')} partitions, {params.get('compression', '?')}. Targets: "
        + ", ".join(
            f"{target} ({'–' if ok is None else 'met' if ok else '**missed**'})"
            for target, ok in consumer_checks(data)
        )
        + ". × kcat -C per round (the tools alternate; median (min–max) of the rounds' ratios): "
        + ", ".join(
            f"{label} {_num(r[0], 2)} ({_num(r[1], 2)}–{_num(r[2], 2)})"
            for label, member in (("kafka-python", "consumer"), ("librdkafka", "consumer_librdkafka"))
            if member in data and (r := kcat_ratio(data, member)) is not None
        )
        + "."
    )
    out.append("")
    out.append(
        "CPU s per GB: the reader's CPU seconds per GB it wrote (from its first byte on), then the "
        "brokers' in the same time: on this host they share the same cores, so MB/s follows the "
        "sum. kcat writes each record's value as it comes; the consumer also copies each value "
        "into a Python object, finds its lines and source in it (dedup, whole lines, day), and "
        "fsyncs before every commit."
    )
    out += consumer_profile(data.get("profile"))
    out += consumer_profile(data.get("profile_librdkafka"), "with kafka.client librdkafka")
    return out


def agent_profile(part: dict[str, Any]) -> list[str]:
    """Where the agent's CPU goes shipping 2 KB lines (bench_profile.py: perf, every thread)."""
    prof = part.get("data") if part else None
    if not isinstance(prof, dict):
        return [f"profile part failed: {part.get('error', 'no data')}"[:300]] if part else []
    if prof.get("missing"):
        return [f"_Agent profile: not taken ({prof['missing']})._"]
    stages = ", ".join(f"{name} {_num(share, 1)} %" for name, share in prof.get("stages", []))
    threads = ", ".join(f"{name} {_num(share, 1)} %" for name, share in prof.get("threads", []))
    return [
        f"Where the agent's CPU goes shipping {_num(prof.get('line_bytes'))} B lines as fast as it can "
        f"(kafka.client {prof.get('client')}, one core; `perf record -g` at {prof.get('rate_hz')} Hz over "
        f"{_num(prof.get('seconds'))} s, {_num(prof.get('samples'))} samples of every thread, kernel "
        f"included, {_num(prof.get('mb_s'), 1)} MB/s acknowledged while sampled; each sample in the first "
        f"stage its call chain matches, bench/bench_profile.py): {stages}. By thread: {threads}.",
    ]


def consumer_profile(prof: dict[str, Any] | None, which: str = "") -> list[str]:
    """Where the consumer's CPU goes: bench_consumer.py --profile (py-spy, every thread)."""
    if not prof:
        return []
    if prof.get("missing"):
        return ["", f"_Profile: not taken ({prof['missing']})._"]
    stages = ", ".join(f"{name} {share} %" for name, share in prof.get("stages", []))
    threads = ", ".join(f"{name} {share} %" for name, share in prof.get("threads", []))
    top = "; ".join(f"`{name}` {share} %" for name, share in prof.get("top_functions", [])[:6])
    return [
        "",
        f"Where the consumer's CPU goes{' ' + which if which else ''} (one more run under py-spy at "
        f"{prof.get('rate_hz')} Hz, "
        f"{_num(prof.get('samples'))} CPU samples over every thread, {_num(prof.get('mb_s'), 1)} MB/s "
        f"while sampled): {stages}. By thread: {threads}. Busiest functions: {top}."
        + (
            " py-spy sees the interpreter's threads only: librdkafka's are in the CPU column."
            if which
            else ""
        ),
    ]


def clients_table(part: dict[str, Any]) -> list[str]:
    """kafka-python against librdkafka with the agent's records (bench_clients.py)."""
    data = part.get("data")
    if not isinstance(data, dict) or not data.get("rows"):
        return [f"clients part failed: {part.get('error', 'no data')}"[:300]] if part else []
    setup = data.get("setup", {})
    versions = setup.get("versions", {})
    rows = []
    for r in data["rows"]:
        cpu, mbs = r.get("cpu_percent") or {}, r.get("mb_per_s") or {}
        trickle = r.get("mode") == "trickle"
        rows.append([
            "10 records/s (the agent at 200 lines/s)" if trickle else "one partition, as fast as acked",
            str(r.get("client")),
            f"{_num(cpu.get('median'), 2)} ({_num(cpu.get('min'), 2)}–{_num(cpu.get('max'), 2)})",
            "–" if trickle else f"{_num(mbs.get('median'), 1)} ({_num(mbs.get('min'), 1)}–{_num(mbs.get('max'), 1)})",
            "–" if trickle else _num(1000 * (r.get("cpu_s_per_mb") or 0), 1),
            str(r.get("error", ""))[:120],
        ])  # fmt: skip
    return [
        f"Same records through both clients, pinned to one core, {setup.get('rounds')} rounds alternating; "
        f"median (min–max). kafka-python {versions.get('kafka-python', '?')}, confluent-kafka "
        f"{versions.get('confluent-kafka', '?')} (librdkafka {versions.get('librdkafka', '?')}); acks=all, "
        f"idempotence, lz4, linger 0; 64 KiB records of app-log-like 2 KB lines under one key for "
        f"{setup.get('partition_s')} s, at most 3 MiB in flight. "
        "Reproduce: `.venv/bin/python bench/bench_clients.py --out bench/results/clients.json`.",
        "",
        *_table(["load", "client", "CPU % of one core", "MB/s", "CPU ms per MB", "notes"], rows),
    ]


def watermarks_table(part: dict[str, Any]) -> list[str]:
    """bench_agent.py --watermark-cost: the agent's CPU and RSS with watermarks on and off."""
    wm = (part.get("data") or {}).get("watermark_cost_200_lines_s")
    if not isinstance(wm, dict) or "on" not in wm:
        return [f"_watermarks: failed — {part.get('error', '')}_"]
    rows = []
    for mode in ("off", "on"):
        r = wm[mode]
        lo, hi = r["cpu_percent_spread"]
        when = f"every {wm['interval_s']:g} s" if mode == "on" else "off"
        rows.append(
            [
                f"watermarks {when}",
                f"{_num(r['cpu_percent_median'], 2)} ({_num(lo, 2)}–{_num(hi, 2)})",
                _num(r["rss_mb_median"], 1),
                ", ".join(str(n) for n in r["watermarks_sent"]),
            ]
        )
    out = _table(["agent", "CPU % of one core: median (min–max)", "RSS MB", "watermarks sent per run"], rows)
    met = _le(wm.get("cpu_percent_cost"), WATERMARK_COST_TARGET)
    verdict = "met" if met else "**missed**" if met is False else "–"
    on, off = wm["on"]["cpu_percent_spread"], wm["off"]["cpu_percent_spread"]
    if on[0] <= off[1] and off[0] <= on[1]:
        verdict += "; the two modes' ranges overlap: no difference measurable in this run"
    out += [
        "",
        f"{wm['lines_per_s']} lines/s over {wm['busy_files']} of {_num(wm['files'])} files (the others idle), "
        f"{wm['runs']} rounds per mode, alternating, {wm['seconds']:g} s measured per run. Cost: "
        f"{_num(wm.get('cpu_percent_cost'), 3)} % of one core, RSS {wm.get('rss_mb_cost')} MB "
        f"(target <= {WATERMARK_COST_TARGET} %: {verdict}).",
    ]
    return out


def security_table(part: dict[str, Any]) -> list[str]:
    """bench_security.py: agent and consumer over SASL_SSL (SCRAM) as a ratio to plaintext."""
    data = part.get("data")
    if not isinstance(data, dict) or "agent" not in data:
        return [f"_security: failed — {part.get('error', '')}_"]
    rows = []
    for name, label, d in (
        ("agent", "keplerlog-agent, lines/s (200 B lines)", 0),
        ("consumer", "keplerlog-consumer, MB/s", 1),
    ):
        r = data.get(name) or {}
        plain, sec = r.get("plaintext") or {}, r.get("sasl_ssl") or {}
        rows.append(
            [
                label,
                f"{_num(plain.get('median'), d)} ({_num(plain.get('min'), d)}–{_num(plain.get('max'), d)})",
                f"{_num(sec.get('median'), d)} ({_num(sec.get('min'), d)}–{_num(sec.get('max'), d)})",
                _num(r.get("ratio"), 2),
            ]
        )
    params = data.get("params") or {}
    out = _table(["part", "plaintext: median (min–max)", "SASL_SSL + SCRAM: median (min–max)", "ratio"], rows)
    out.append("")
    out.append(
        f"One broker with both listeners (RF 1); {params.get('runs', '?')} runs per mode, alternating "
        "(the order flips every round); "
        f"{_num(params.get('lines'))} lines per agent run, {params.get('mb', '?')} MB per consumer run."
    )
    return out


def _worst(r: dict[str, Any], key: str) -> Any:
    """The largest of a latency figure over the rounds (`key`_spread's max), else the figure."""
    spread = r.get(key.replace("_ms", "_spread_ms"))
    return spread[1] if spread else r.get(key)


def _over_rounds(r: dict[str, Any], key: str) -> str:
    """A latency figure as 'median (min–max)' over the rounds, or the lone figure."""
    spread = r.get(key.replace("_ms", "_spread_ms"))
    if not spread or (r.get("rounds") or 1) < 2:
        return _num(r.get(key), 1)
    return f"{_num(r.get(key), 1)} ({_num(spread[0], 1)}–{_num(spread[1], 1)})"


def latency_table(part: dict[str, Any], note: bool = True) -> list[str]:
    """Rate | p50 | p90 | p99 | max | lines | agent and consumer CPU | stages; `note`: what they hold."""
    data = part.get("data") or {}
    if not part.get("ok") and not data.get("results"):
        return [f"_latency: failed — {data.get('error') or part.get('error', '')}_"]
    header = ["lines/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "received/written (duplicated)",
              "agent CPU s", "consumer CPU s", "p50 ms: write → agent read", "agent read → broker",
              "broker → fetched", "fetched → day file", "notes"]  # fmt: skip
    rows = []
    for r in data.get("results", []):
        stages = r.get("breakdown") or {}
        rows.append([
            _num(r.get("rate")), _over_rounds(r, "p50_ms"), _num(r.get("p90_ms"), 1),
            _over_rounds(r, "p99_ms"), _num(r.get("max_ms"), 1),
            f"{_num(r.get('received'))}/{_num(r.get('written'))} ({_num(r.get('duplicates'))})",
            _num(r.get("agent_cpu_s"), 2), _num(r.get("consumer_cpu_s"), 2),
            *(_num((stages.get(k) or {}).get("p50_ms"), 0)
              for k in ("write_to_read", "read_to_broker", "broker_to_fetched", "fetched_to_day_file")),
            str(r.get("error", ""))[:160],
        ])  # fmt: skip
    setup = data.get("setup") or {}
    client, rounds = setup.get("agent_client"), setup.get("rounds") or 1
    said = [f"The agent's Kafka client: {client}." if client else ""]
    if setup.get("consumer_client"):
        said[0] += f" The consumer's: {setup['consumer_client']}."
    if rounds > 1:
        said[0] += (
            f" {rounds} rounds per rate (a fresh agent and consumer each, the rates' order flipped"
            " every round): p50 and p99 are the median of the rounds' figures with their min–max,"
            " the other figures medians, lines summed over the rounds."
        )
    if setup.get("warmup_s"):
        warm = data.get("warmup") or {}
        said[0] += (
            f" Before the rounds, one unmeasured {setup['warmup_s']:.0f} s run at the highest rate"
            " warms the freshly started brokers (its p99 here:"
            f" {_num(warm.get('p99_ms'), 1)} ms; a service's cluster is long warm)."
        )
    said = [said[0].strip(), ""] if said[0].strip() else []
    if not note:
        return [*said, *_table(header, rows)]
    return [
        *said,
        *_table(header, rows),
        "",
        "Where the time goes (p50 of each stage; bench_latency.py's docstring says what each holds): "
        "the agent reads a busy file once about `read_coalesce_lines` (20) lines have come, at least "
        "20 ms and at most `read_coalesce_ms` (100 ms) after its previous read (the price of one "
        "read, record and request per 20 lines instead of per write); "
        '"broker → fetched" is replication to the follower (acks=all) and a fetch, as a plain '
        'consumer beside ours gets the record; "fetched → day file" is our consumer\'s own part: its '
        "batch (written as soon as it has caught up and its writer is free, `batch_idle_ms`), its "
        "intent record and the write, behind the fsyncs of the batch before it.",
    ]


def markdown(merged: dict[str, Any]) -> str:
    """The results as Markdown: machine, throughput, consumer and latency tables."""
    m = merged["machine"]
    lines = [
        f"Measured {m.get('date')} on {m.get('nproc')} × {m.get('cpu_model')}, "
        f"{m.get('mem_gb')} GB RAM, Linux {m.get('kernel')}"
        + (" — **quick smoke run, not representative**" if merged.get("quick") else "")
        + ". Kafka: 3 local KRaft nodes, 4 partitions, RF 2, acks=all, lz4; each tool pinned "
        "to one core. Reproduce with `make bench` (see bench/README.md).",
        "",
        f"**Shipping a pre-written file into Kafka**{_when(merged['parts'].get('peers', {}))}",
        "",
        *throughput_table(merged),
        "",
        *ratio_table(merged["parts"].get("peers", {})),
        "",
        f"**Where the agent's CPU goes (bench/bench_profile.py)**{_when(merged['parts'].get('profile', {}))}",
        "",
        *agent_profile(merged["parts"].get("profile", {})),
        "",
        f"**Agent (bench/bench_agent.py)**{_when(merged['parts'].get('agent', {}))}",
        "",
        *agent_sections(merged["parts"].get("agent", {})),
        "",
        f"**Agent with many files (bench/bench_files.py)**{_when(merged['parts'].get('files', {}))}",
        "",
        *files_table(merged["parts"].get("files", {})),
        "",
        f"**Consumer: Kafka to day files**{_when(merged['parts'].get('consumer', {}))}",
        "",
        *consumer_table(merged["parts"].get("consumer", {})),
        "",
        f"**Security: TLS + SCRAM against plaintext (bench/bench_security.py)**"
        f"{_when(merged['parts'].get('security', {}))}",
        "",
        *security_table(merged["parts"].get("security", {})),
        "",
        f"**A fleet's load on the consumers (bench/bench_fleet.py)**{_when(merged['parts'].get('fleet', {}))}",
        "",
        *fleet_table(merged["parts"].get("fleet", {})),
        "",
        f"**A long Kafka outage (bench/bench_outage.py)**{_when(merged['parts'].get('outage', {}))}",
        "",
        *outage_table(merged["parts"].get("outage", {})),
        "",
        "**The agent's producer client: kafka-python against librdkafka (bench/bench_clients.py)**"
        + _when(merged["parts"].get("clients", {})),
        "",
        *clients_table(merged["parts"].get("clients", {})),
        "",
        "**Completeness audit: what the agent's watermarks cost (bench/bench_agent.py --watermark-cost)**"
        + _when(merged["parts"].get("watermarks", {})),
        "",
        *watermarks_table(merged["parts"].get("watermarks", {})),
        "",
        "**End-to-end latency (file → agent → Kafka → consumer → day file)**"
        + _when(merged["parts"].get("latency", {})),
        "",
        *latency_table(merged["parts"].get("latency", {})),
        "",
        "**The same with the fixed read wait (`limits.read_coalesce_lines: 0`: less CPU above a "
        "trickle, keplerlog/agent/pacer.py)**" + _when(merged["parts"].get("latency-fixed", {})),
        "",
        *latency_table(merged["parts"].get("latency-fixed", {}), note=False),
        "",
        "**The same with the consumer's librdkafka client (`kafka.client: librdkafka`, "
        "consumer/rdclient.py)**" + _when(merged["parts"].get("latency-rdconsumer", {})),
        "",
        *latency_table(merged["parts"].get("latency-rdconsumer", {}), note=False),
        "",
        "![throughput](bench/results/throughput.png) ![latency](bench/results/latency.png)",
        "",
        _missed_line(missed_targets(merged)),
    ]
    return "\n".join(lines) + "\n"


def _missed_line(missed: list[str]) -> str:
    if not missed:
        return "**Targets**: every target shown above is met."
    return "**Targets missed**: " + "; ".join(missed) + "."


def update_readme(readme: Path, block: str) -> bool:
    """Replace only the text between the bench markers; warn (and change nothing) otherwise."""
    if not readme.exists():
        print(f"warning: {readme} not found; results table not inserted")
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        print(f"warning: {readme} has no '{START}' ... '{END}' block; results table not inserted")
        return False
    new = text[: start + len(START)] + "\n" + block + text[end:]
    if new != text:
        readme.write_text(new)
    print(f"updated the bench block of {readme}")
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the parts, merge, write results.{json,md}, charts, README block."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated parts to rerun")
    ap.add_argument("--quick", action="store_true", help="small workloads (smoke test)")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument(
        "--render",
        action="store_true",
        help="run nothing: re-render tables, charts, README from the last JSON",
    )
    args = ap.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - {p.name for p in PARTS}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: {[p.name for p in PARTS]}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    last = RESULTS_DIR / "results.json"
    merged: dict[str, Any] = {
        "machine": machine_info(),
        "quick": args.quick,
        "parts": {},
    }
    last_run = json.loads(last.read_text()) if last.exists() else {}
    if args.render and last_run:  # keep the date and machine of the runs being shown
        merged["machine"] = last_run.get("machine", merged["machine"])
    for part in PARTS:
        if args.render or (only and part.name not in only):
            merged["parts"][part.name] = previous(part, last_run, render=args.render)
        else:
            merged["parts"][part.name] = run_part(part, args.quick)

    (RESULTS_DIR / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    table = markdown(merged)
    (RESULTS_DIR / "results.md").write_text("# kepler-log benchmark results\n\n" + table)
    print(f"wrote {RESULTS_DIR / 'results.json'} and results.md")
    try:
        from plot import plot_all

        for path in plot_all(merged, RESULTS_DIR):
            print(f"wrote {path}")
    except Exception as exc:
        print(f"warning: charts failed: {exc}")
    if not args.no_readme:
        update_readme(args.readme, table)
    failed = [name for name, p in merged["parts"].items() if not p.get("ok")]
    print("failed parts: " + (", ".join(failed) if failed else "none"))
    missed = missed_targets(merged)
    print("targets missed: " + ("; ".join(missed) if missed else "none"))
    # 1: a part failed to run; 3: everything ran but a target was missed
    return 1 if failed else 3 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

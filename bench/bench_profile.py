"""Where the agent's CPU goes while it ships 2 KB lines as fast as it can: a `perf` profile.

The peers part shows the agent behind kcat on long lines, with the agent's own (interpreter)
threads the busier half. This part says what those threads do: the agent (the service image's
Kafka client) ships the peers part's 2 KB workload into a 3-broker cluster, pinned to one core,
and `perf record -g` samples it (every thread, kernel included) for `--seconds`. Each sample is
put in one stage by the frames of its call chain (first rule that matches, see STAGES):
page faults and unmaps of freshly allocated buffers, the file read's copy, lz4, counting lines,
the network, copies, the interpreter, the rest.

Usage: .venv/bin/python bench/bench_profile.py --out bench/results/profile.json [--seconds 8]
Needs perf (Debian: linux-perf; scripts/bench-deps.sh installs it) and kernel.perf_event_paranoid
low enough for root to sample a child (the default is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_agent import Agent, metrics
from keplerlog.testing.kafka_node import KafkaCluster
from peers.harness import RESULTS_DIR, WORK_DIR, deployed_client, machine_info, write_workload

LINE = 2000
LINES = 3_000_000  # the peers part's 2 KB workload (reused when present): ~6 GB, minutes of work

# (stage, frames: a sample belongs to the first stage one of whose names is in its call chain)
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("page faults and unmaps of fresh buffers", ("asm_exc_page_fault", "__x64_sys_munmap", "__x64_sys_mmap")),
    ("the file read (pread's copy)", ("__x64_sys_pread64", "__x64_sys_read")),
    ("lz4 compression (librdkafka)", ("LZ4_",)),
    ("counting lines (bytes.count)", ("_Py_bytes_count", "bytes_count")),
    ("network: send, poll, wake-ups", ("sendmsg", "recvmsg", "sendto", "recvfrom", "do_sys_poll", "futex")),
    ("memory copies in user space", ("__memmove", "__memcpy", "memcpy")),
    ("the interpreter (Python code)", ("_PyEval_EvalFrameDefault",)),
]
OTHER = "other"


def classify(frames: list[str]) -> str:
    """The stage of one sample from its call chain's symbol names (innermost first)."""
    for stage, names in STAGES:
        if any(name in frame for frame in frames for name in names):
            return stage
    return OTHER


def parse_perf_script(text: str) -> tuple[Counter[str], Counter[str], Counter[tuple[str, str]]]:
    """Samples per stage, per thread group and per (thread group, stage) from `perf script`.

    `perf script -F comm,ip,sym` prints a line with the thread's name, then one frame per line
    (address, symbol),
    then a blank line, for each sample. Numbered threads (rdk:broker1) count as one group.
    """
    stages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    both: Counter[tuple[str, str]] = Counter()
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if not lines:
            continue
        thread = lines[0].split()[0].rstrip("0123456789")
        frames = [line.split(None, 1)[-1] for line in lines[1:]]
        stage = classify(frames)
        stages[stage] += 1
        threads[thread] += 1
        both[(thread, stage)] += 1
    return stages, threads, both


def shares(counts: Counter[Any], total: int) -> list[tuple[Any, float]]:
    """(name, % of all samples), largest first."""
    return [(name, round(100 * n / total, 1)) for name, n in counts.most_common()]


def profile(seconds: float, core: int, work: Path) -> dict[str, Any]:
    """Run the cluster and the agent, sample the agent, return the shares."""
    perf = shutil.which("perf")
    if perf is None:
        return {"missing": "perf (Debian: linux-perf; scripts/bench-deps.sh installs it)"}
    data = WORK_DIR / "files" / f"lines-{LINE}B-{LINES}.log"
    write_workload(data, LINES, LINE)
    cluster = KafkaCluster(work / "kafka", size=3)
    cluster.start()
    try:
        cluster.create_topic("profile", partitions=4, replication=2)
        log = work / "logs" / "app.log"
        log.parent.mkdir(parents=True)
        client = deployed_client()
        agent = Agent(work, cluster.bootstrap, "profile", log, core, client=client)
        try:
            os.link(data, log)
            time.sleep(3)  # past the start: steady shipping
            before = metrics(agent.port).get("bytes_acked_total", 0)
            raw = work / "perf.data"
            record = [perf, "record", "-q", "-F", "999", "-g", "-p", str(agent.proc.pid), "-o", str(raw)]
            subprocess.run([*record, "--", "sleep", str(seconds)], check=True, capture_output=True)
            after = metrics(agent.port).get("bytes_acked_total", 0)
        finally:
            agent.stop()
        script = subprocess.run(
            [perf, "script", "-i", str(raw), "-F", "comm,ip,sym"], check=True, capture_output=True, text=True
        ).stdout
    finally:
        cluster.destroy()
    stages, threads, both = parse_perf_script(script)
    total = sum(stages.values())
    if not total:
        return {"missing": "perf recorded no samples"}
    return {
        "client": client,
        "line_bytes": LINE,
        "seconds": seconds,
        "rate_hz": 999,
        "samples": total,
        "mb_s": round((after - before) / seconds / 1e6, 1),
        "stages": shares(stages, total),
        "threads": shares(threads, total),
        "by_thread": [[t, s, round(100 * n / total, 1)] for (t, s), n in both.most_common()],
    }


def main() -> int:
    """Profile once and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "profile.json")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds sampled")
    ap.add_argument("--core", type=int, default=1, help="core the agent is pinned to")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=WORK_DIR))
    try:
        result = {"machine": machine_info()} | profile(args.seconds, args.core, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, share in result.get("stages", []):
        print(f"{share:6.1f} %  {name}")
    print(result.get("missing") or f"wrote {args.out}")
    return 0 if "missing" not in result else 1


if __name__ == "__main__":
    sys.exit(main())

"""Charts of the merged benchmark results (bench/results/results.json) as PNG files.

matplotlib is optional (scripts/bench-deps.sh installs it into .venv): without it the
harness still writes the JSON and Markdown tables and just says the charts were skipped.
Usage: `.venv/bin/python bench/plot.py [bench/results/results.json]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _throughput_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The successful shipping runs of every tool (peers, and the agent's own bench)."""
    peers = results.get("parts", {}).get("peers", {}).get("data") or {}
    return [r for r in peers.get("results", []) if r.get("ok")]


def plot_throughput(results: dict[str, Any], out: Path) -> Path | None:
    """Grouped bars: lines/s and CPU µs per line for each tool, one group per line size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _throughput_rows(results)
    if not rows:
        return None
    sizes = {r["variant"]: r.get("line_bytes", 0) for r in rows}
    variants = sorted(sizes, key=lambda v: sizes[v])
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    by = {(r["tool"], r["variant"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    metrics = (("lines_per_s", "lines/s (higher is better)"),
               ("cpu_us_per_line", "CPU µs per line (lower is better)"))  # fmt: skip
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, variant in enumerate(variants):
            values = [by.get((t, variant), {}).get(key, 0) or 0 for t in tools]
            pos = [j + i * width for j in range(len(tools))]
            ax.bar(pos, values, width, label=f"{variant} lines")
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(tools))])
        ax.set_xticklabels(tools, rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    machine = results.get("machine", {})
    fig.suptitle(
        f"Shipping a file into Kafka (3 nodes, RF 2, acks=all, one pinned core) — "
        f"{machine.get('nproc', '?')} × {machine.get('cpu_model', '?')}, "
        f"{str(machine.get('date', ''))[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_latency(results: dict[str, Any], out: Path) -> Path | None:
    """p50/p90/p99/max end-to-end latency per rate, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = results.get("parts", {}).get("latency", {}).get("data") or {}
    rows = [r for r in data.get("results", []) if r.get("p50_ms") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [r.get(key) or 0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=key[:-3])
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['rate']:,} lines/s" for r in rows])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("ms from write to day file")
    ax.set_title("kepler-log end-to-end latency (agent → Kafka → consumer)", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_all(results: dict[str, Any], outdir: Path = RESULTS_DIR) -> list[Path]:
    """Draw every chart the results allow; empty when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: matplotlib not installed (scripts/bench-deps.sh); charts skipped")
        return []
    drawn = [
        plot_throughput(results, outdir / "throughput.png"),
        plot_latency(results, outdir / "latency.png"),
    ]
    return [p for p in drawn if p is not None]


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "results.json"
    for path in plot_all(json.loads(source.read_text()), source.parent):
        print(f"wrote {path}")

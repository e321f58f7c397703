#!/usr/bin/env python3
"""The pipeline at a glance, from Prometheus: what an operator keeps open (`make status`).

Everything comes from the lab's (or any) Prometheus over its HTTP API, over the last minute
only: lines/s shipped and written, end-to-end latency p50/p99 from the consumers' histogram,
consumer lag and agents' unacknowledged bytes, drops, disk, broker health, targets and firing
alerts. One view by default; `--watch N` redraws every N seconds until Ctrl-C. `--snapshot`
also writes the view into bench/results/status.txt and the README's status block, so the
README shows what the code printed, never a hand-edited picture.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB_PROMETHEUS = "kl-lab-prometheus"
README_BEGIN = "<!-- status:begin (scripts/status.py --snapshot) -->"
README_END = "<!-- status:end -->"


class Prometheus:
    """A minimal client of the HTTP API (instant queries, targets, alerts)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: str) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body.get('error', body)}")
        return body["data"]

    def vector(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Return the samples of an instant query as (labels, value)."""
        return [(r["metric"], float(r["value"][1])) for r in self._get("query", query=expr)["result"]]

    def scalar(self, expr: str) -> float | None:
        """Return the single value of a query that yields one sample, None when it yields none."""
        samples = self.vector(expr)
        return samples[0][1] if samples else None

    def targets(self) -> list[dict]:
        """Return the active scrape targets."""
        return self._get("targets")["activeTargets"]

    def alerts(self) -> list[dict]:
        """Return the alerts pending or firing now."""
        return self._get("alerts")["alerts"]


def lab_url() -> str:
    """Return the URL of the lab's Prometheus (its container's address on the lab network)."""
    out = subprocess.run(
        [
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            LAB_PROMETHEUS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    address = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else ""
    if not address:
        raise SystemExit(f"status: no {LAB_PROMETHEUS} container (run `make demo`, or pass --prometheus URL)")
    return f"http://{address}:9090"


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    """Return a number for the view ('-' when there is no data yet)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def render(prom: Prometheus) -> str:
    """Return the whole view as text."""
    lines = [f"kepler-log status  {time.strftime('%Y-%m-%d %H:%M:%S')}  (Prometheus {prom.url}, last minute)"]
    by_job: dict[str, list[int]] = {}
    for t in prom.targets():
        up = by_job.setdefault(t["labels"]["job"], [0, 0])
        up[0] += t["health"] == "up"
        up[1] += 1
    lines.append("targets up:  " + "   ".join(f"{job} {u}/{n}" for job, (u, n) in sorted(by_job.items())))
    lines.append("")
    lines.append(f"{'service/module':<28}{'lines/s':>10}{'bytes/s':>14}")
    written = prom.vector("sum by (service, module) (rate(keplerlog_consumer_written_lines_total[1m]))")
    wbytes = {
        (m["service"], m["module"]): v
        for m, v in prom.vector("sum by (service, module) (rate(keplerlog_consumer_written_bytes_total[1m]))")
    }
    for labels, value in sorted(written, key=lambda s: (s[0].get("service", ""), s[0].get("module", ""))):
        key = (labels.get("service", "?"), labels.get("module", "?"))
        lines.append(f"{key[0] + '/' + key[1]:<28}{fmt(value, '', 1):>10}{fmt(wbytes.get(key), '', 0):>14}")
    acked = prom.scalar("sum(rate(keplerlog_agent_lines_acked_total[1m]))")
    lines.append(f"{'agents, lines/s acked by Kafka':<28}{fmt(acked, '', 1):>10}")
    lines.append("")
    quantile = "histogram_quantile({q}, sum by (le) (rate(keplerlog_consumer_latency_seconds_bucket[1m])))"
    p50, p99 = (prom.scalar(quantile.format(q=q)) for q in (0.5, 0.99))
    lines.append(
        f"latency (agent read -> fsynced)  p50 {fmt(p50, ' s', 3)}   p99 {fmt(p99, ' s', 3)}   target < 4 s"
    )
    lag = prom.scalar("sum(keplerlog_consumer_lag_records)")
    unacked = prom.scalar("sum(keplerlog_agent_file_lag_bytes)")
    lines.append(f"consumer lag {fmt(lag, ' records')}   agents' unacknowledged {fmt(unacked, ' bytes')}")
    drops = {
        "quarantined": "sum(increase(keplerlog_consumer_quarantined_total[1h]))",
        "unsafe names": "sum(increase(keplerlog_consumer_unsafe_names_total[1h]))",
        "gap bytes": "sum(increase(keplerlog_consumer_gap_bytes_total[1h]))",
        "agent lost bytes": "sum(increase(keplerlog_agent_lost_bytes_total[1h]))",
        "send errors": "sum(increase(keplerlog_agent_send_errors_total[1h]))",
    }
    lines.append("last hour:  " + "   ".join(f"{k} {fmt(prom.scalar(e))}" for k, e in drops.items()))
    free = prom.scalar(
        "min(keplerlog_consumer_data_root_free_bytes / keplerlog_consumer_data_root_size_bytes) * 100"
    )
    paused = prom.scalar("max(keplerlog_consumer_disk_full_paused)")
    lines.append(f"data root free {fmt(free, ' %', 1)}   disk-full pause {fmt(paused)}")
    urp = prom.scalar("sum(kafka_server_replicamanager_underreplicatedpartitions)")
    offline = prom.scalar("sum(kafka_controller_kafkacontroller_offlinepartitionscount)")
    active = prom.scalar("sum(kafka_controller_kafkacontroller_activecontrollercount)")
    lines.append(
        f"kafka: under-replicated {fmt(urp)}   offline partitions {fmt(offline)}   active controllers {fmt(active)}"
    )
    alerts = prom.alerts()
    firing = [a for a in alerts if a.get("state") == "firing"]
    lines.append("")
    lines.append(f"alerts firing: {len(firing)}   pending: {len(alerts) - len(firing)}")
    for a in sorted(alerts, key=lambda a: (a.get("state") != "firing", a["labels"].get("alertname", ""))):
        where = a["labels"].get("instance") or a["labels"].get("module") or ""
        lines.append(f"  {a['state']:<8}{a['labels'].get('alertname', '?'):<36}{where}")
    return "\n".join(lines)


def snapshot(view: str) -> None:
    """Write the view to bench/results/status.txt and into the README's status block."""
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/status.txt").write_text(view + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        block = f"{README_BEGIN}\n```text\n{view}\n```\n{README_END}"
        readme.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    """Print the view once, or every --watch seconds until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", help="Prometheus URL (default: the lab's container)")
    parser.add_argument("--watch", type=float, default=0, help="redraw every N seconds until Ctrl-C")
    parser.add_argument(
        "--snapshot", action="store_true", help="also write bench/results/status.txt and README"
    )
    args = parser.parse_args(argv)
    prom = Prometheus(args.prometheus or lab_url())
    try:
        while True:
            try:
                view = render(prom)
            except (OSError, RuntimeError) as exc:
                view = f"status: Prometheus at {prom.url} does not answer: {exc}"
                if not args.watch:
                    print(view, file=sys.stderr)
                    return 1
            if args.watch:
                sys.stdout.write("\033[H\033[2J")
            print(view)
            if args.snapshot:
                snapshot(view)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

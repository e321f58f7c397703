"""Print the findings for people (a table and lists) or for programs (one JSON document).

Hosts and paths come from agents' record headers: in the text form every character that is not
printable is escaped, so a crafted name cannot move the cursor or rewrite the terminal.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from .report import Row
from .summary import Findings, Totals


def printable(text: str) -> str:
    """Escape what is not printable (control characters, lone surrogates) and backslashes."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape", "backslashreplace").decode()
        for c in text
    )


def percent(value: float) -> str:
    """Format a share as a percentage with the precision the 0.01 % threshold needs."""
    return f"{value * 100:.4f}%"


def when(ts_ms: int | None) -> str:
    """Format an epoch millisecond time as UTC ISO 8601 (`-` for none)."""
    if ts_ms is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts_ms} ms"


def _ranges(row: Row) -> str:
    parts = []
    if row.missing_bytes:
        listed = ", ".join(f"[{s}, {e})" for s, e in row.missing)
        unlisted = row.missing_bytes - sum(e - s for s, e in row.missing)
        more = f" (+{unlisted} bytes below them, not listed)" if unlisted else ""
        parts.append(f"missing {row.missing_bytes} bytes at {listed or '-'}{more}")
    if row.lost_bytes:
        listed = ", ".join(f"[{s}, {e}) {r}" for s, e, r in row.lost)
        parts.append(f"lost at source {row.lost_bytes} bytes: {listed}")
    if row.incomplete_since_ms is not None:
        parts.append(f"incomplete since {when(row.incomplete_since_ms)}")
    return "; ".join(parts)


def text(findings: Findings, root: str) -> str:
    """Return the human-readable audit of one day."""
    f = findings
    lines = [
        f"keplerlog-audit {f.day}: {f.reports} report file{'s' if f.reports != 1 else ''} "
        f"below {printable(root)}, "
        f"loss threshold {percent(f.threshold)}",
        "",
    ]
    table = [
        [
            "service",
            "module",
            "files",
            "shipped",
            "stored",
            "missing",
            "lost_at_source",
            "complete",
            "loss_rate",
            "",
        ]
    ]

    def line(service: str, module: str, t: Totals) -> list[str]:
        flag = "OVER" if t.loss_rate > f.threshold else ""
        numbers = [t.files, t.shipped, t.stored, t.missing, t.lost]
        return [service, module, *map(str, numbers), percent(t.completeness), percent(t.loss_rate), flag]

    for (service, module), totals in sorted(f.modules.items()):
        table.append(line(service, module, totals))
    table.append(line("TOTAL", "", f.total))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(f"incomplete files: {len(f.incomplete)}")
    for row in f.incomplete:
        name = f"{row.service}/{row.module} {row.host} {row.path} (file {row.file_id}, {row.state})"
        lines.append(f"  {printable(name)}: {_ranges(row)}")
    lines.append("")
    lines.append(f"silent agents (watermarks on {f.previous_day}, none on {f.day}): {len(f.silent)}")
    for s in f.silent:
        lines.append(
            f"  host {printable(s.host)} service {printable(s.service)}, "
            f"last watermark {when(s.last_watermark_ts_ms)}"
        )
    lines.append("")
    problems = []
    if f.over:
        problems.append(
            f"loss rate over {percent(f.threshold)} for {', '.join(printable(n) for n in f.over)}"
        )
    if f.silent:
        problems.append(f"{len(f.silent)} silent agent{'s' if len(f.silent) > 1 else ''}")
    lines.append(f"FAIL: {'; '.join(problems)}" if problems else "OK")
    return "\n".join(lines) + "\n"


def _totals(t: Totals) -> dict[str, Any]:
    return {
        "files": t.files,
        "shipped": t.shipped,
        "stored": t.stored,
        "missing_bytes": t.missing,
        "lost_bytes": t.lost,
        "completeness": t.completeness,
        "loss_rate": t.loss_rate,
    }


def as_json(findings: Findings) -> str:
    """Return the audit of one day as one JSON document (rows in the report format)."""
    f = findings
    body = {
        "day": f.day,
        "previous_day": f.previous_day,
        "threshold": f.threshold,
        "reports": f.reports,
        "modules": [
            {"service": s, "module": m, **_totals(t), "over": t.loss_rate > f.threshold}
            for (s, m), t in sorted(f.modules.items())
        ],
        "total": {**_totals(f.total), "over": f.total.loss_rate > f.threshold},
        "incomplete": [row.to_json() for row in f.incomplete],
        "silent": [
            {"host": s.host, "service": s.service, "last_watermark_ts_ms": s.last_watermark_ts_ms}
            for s in f.silent
        ],
        "ok": f.ok,
    }
    return json.dumps(body, indent=1) + "\n"

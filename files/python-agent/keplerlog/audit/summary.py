"""Turn one day's reports into the audit's findings: per module totals, incomplete files, silence.

Pure functions of the reports, so the numbers can be checked without a file system. Loss rate =
(missing + lost at source) / (shipped + lost at source): every byte the agent saw in the window
is either shipped or lost at the source, and every shipped byte is stored or missing; the
completeness is 1 - loss rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .report import Report, Row

SourceKey = tuple[str, str, str]  # service, host, file_id: the consumer's source key


@dataclass
class Totals:
    """Bytes of one service/module (or of everything) in the day's windows."""

    shipped: int = 0
    stored: int = 0
    missing: int = 0
    lost: int = 0
    files: int = 0

    def add(self, row: Row) -> None:
        """Count one source file's row."""
        self.shipped += row.shipped
        self.stored += row.stored
        self.missing += row.missing_bytes
        self.lost += row.lost_bytes
        self.files += 1

    @property
    def loss_rate(self) -> float:
        """Share of the bytes the agents saw that are not in a day file (0 with no bytes)."""
        seen = self.shipped + self.lost
        return (self.missing + self.lost) / seen if seen else 0.0

    @property
    def completeness(self) -> float:
        """Share of the bytes the agents saw that are stored (1 with no bytes)."""
        seen = self.shipped + self.lost
        return self.stored / seen if seen else 1.0


@dataclass(frozen=True)
class Silent:
    """A (host, service) that sent watermarks the day before and none on the audited day."""

    host: str
    service: str
    last_watermark_ts_ms: int


@dataclass
class Findings:
    """Everything keplerlog-audit prints for one day."""

    day: str
    previous_day: str
    threshold: float
    reports: int
    modules: dict[tuple[str, str], Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    incomplete: list[Row] = field(default_factory=list)
    silent: list[Silent] = field(default_factory=list)

    @property
    def over(self) -> list[str]:
        """`service/module` names (and `overall`) whose loss rate exceeds the threshold."""
        out = [f"{s}/{m}" for (s, m), t in sorted(self.modules.items()) if t.loss_rate > self.threshold]
        if self.total.loss_rate > self.threshold:
            out.append("overall")
        return out

    @property
    def ok(self) -> bool:
        """Within the threshold everywhere and nobody silent."""
        return not self.over and not self.silent


def latest_rows(reports: Iterable[Report]) -> dict[SourceKey, Row]:
    """One row per source file: the one with the latest watermark if several partitions have it.

    A source is on one partition as long as its records' key is; after a change of the key or of
    the partition count it can appear in two reports. The later account is the newer one, but it
    holds only what was stored through its own partition: the bytes stored through the old one
    read as missing on that day (a known false alarm, documented in the consumer's README).
    """
    out: dict[SourceKey, Row] = {}
    for report in reports:
        for row in report.sources:
            key = (row.service, row.host, row.file_id)
            best = out.get(key)
            if best is None or (row.watermark_ts_ms, row.acked) > (best.watermark_ts_ms, best.acked):
                out[key] = row
    return out


def summarize(
    day: str, previous_day: str, threshold: float, today: list[Report], yesterday: list[Report]
) -> Findings:
    """Totals per service/module and overall, incomplete files, silent agents."""
    findings = Findings(day, previous_day, threshold, len(today))
    rows = latest_rows(today)
    for key in sorted(rows):
        row = rows[key]
        findings.modules.setdefault((row.service, row.module), Totals()).add(row)
        findings.total.add(row)
        if row.missing_bytes or row.lost_bytes:
            findings.incomplete.append(row)
    findings.incomplete.sort(key=lambda r: (r.service, r.module, r.host, r.path, r.file_id))
    heard = {(row.host, row.service) for row in rows.values()}
    last: dict[tuple[str, str], int] = {}
    for row in latest_rows(yesterday).values():
        pair = (row.host, row.service)
        if pair not in heard:
            last[pair] = max(last.get(pair, 0), row.watermark_ts_ms)
    findings.silent = [Silent(host, service, ts) for (host, service), ts in sorted(last.items())]
    return findings

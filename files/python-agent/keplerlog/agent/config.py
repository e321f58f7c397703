"""Agent configuration: one YAML file plus the environment overrides of docs/interfaces.md.

Validation is strict (unknown keys are errors) because a typo in a log shipper's config
otherwise shows up weeks later as missing logs. Every problem is reported as one
`ConfigError` whose message fits on one line; `main` prints it and exits with status 2.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keplerlog.confkit import (
    ConfigError,
    overlay,
    read_yaml,
)
from keplerlog.confkit import boolean as _bool
from keplerlog.confkit import choice as _choice
from keplerlog.confkit import integer as _int
from keplerlog.confkit import number as _float
from keplerlog.confkit import section as _section
from keplerlog.confkit import string as _str
from keplerlog.kafkaauth import KafkaSecurity, parse_client, parse_security

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")
IONICE_CLASSES = ("none", "best-effort", "idle")
START_AT = ("beginning", "end")

# kafka.linger_ms when the config leaves it unset, chosen by how records are cut. The agent
# already packs every read (coalesced: pacer.py) into large records, so a producer
# linger only adds latency and wake-ups (measured: 20 ms -> 2.05 % of a core at 200 lines/s,
# 0 ms -> ~1.6 %). With one_line_per_record each line is its own record and the producer's
# batching is what keeps requests (and CPU) per line down, so it lingers there.
LINGER_MS_BATCHED = 0
LINGER_MS_ONE_LINE_PER_RECORD = 20


@dataclass(frozen=True, slots=True)
class Multiline:
    """Group continuation lines (stack traces) with the line that starts the event."""

    start: re.Pattern[bytes]
    max_lines: int = 500
    timeout_ms: int = 1000


@dataclass(frozen=True, slots=True)
class InputConfig:
    """One input: globs whose files share a module and line-grouping rules."""

    paths: tuple[str, ...]
    module: str
    multiline: Multiline | None = None
    one_line_per_record: bool = False


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """Where and how records are produced."""

    bootstrap_servers: str = "localhost:9092"
    topic: str = "keplerlog"
    compression: str = "lz4"
    linger_ms: int = LINGER_MS_BATCHED  # parse() picks the mode's default when unset
    max_record_bytes: int = 900_000
    client: str = "kafka-python"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS / SASL (keplerlog.kafkaauth)


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits that keep the agent non-intrusive on the application host."""

    # Read-ahead cap. 3 MiB keeps the peak RSS under 40 MB with 900 KB producer batches (their
    # compression briefly copies a batch twice) and ships as fast as 16 MiB does
    # (bench/results/agent.json): one batch in flight plus the next one filling is all a
    # module's partition can use; more read-ahead only grows the heap.
    max_buffer_bytes: int = 3 * 1024 * 1024
    # 0 = as long as one record carries (kafka.max_record_bytes): a line is cut only when it
    # cannot travel whole; the consumer joins the pieces again (consumer/lines.py).
    max_line_bytes: int = 0
    partial_line_timeout_ms: int = 5000
    shutdown_timeout_s: float = 10.0
    checkpoint_interval_ms: int = 1000
    poll_interval_ms: int = 250
    # A busy file is read when about read_coalesce_lines lines have come at its recent rate,
    # at least 20 ms and at most read_coalesce_ms after the previous read (pacer.py); 0: always
    # read_coalesce_ms after it (least CPU above a trickle, 50 ms more delay on average).
    read_coalesce_ms: int = 100
    read_coalesce_lines: int = 20
    close_inactive_s: float = 5.0
    # Descriptors: at most this many files open at once (and never closer than 64 to the
    # process's RLIMIT_NOFILE, which Kafka's sockets share). A file that is read to its end,
    # fully acknowledged and quiet for close_idle_s is closed and remembered by identity; it is
    # reopened (from its acknowledged offset) when it grows. Files beyond the limit wait for a
    # free slot; none is skipped. close_idle_s 0: live files are never closed for idleness.
    max_open_files: int = 1024
    close_idle_s: float = 300.0
    nice: int = 0
    ionice: str = "none"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus endpoint (0 = off), its address, and the periodic summary log line (0 = off).

    The address is loopback unless set: the agent runs on application hosts, and only the
    operator knows which network a scraper may reach it from (a lab container's own network).
    """

    port: int = 0
    log_interval_s: float = 60.0
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class WatermarkConfig:
    """How often the agent accounts for each file's bytes to the consumer's audit (record.py).

    Every `interval_s` (0: never, no watermark at all) one watermark goes out per file whose
    account changed; an unchanged file still gets one every `refresh_s`, so the audit can tell
    an idle file of a live agent from a file whose agent is gone.
    """

    interval_s: float = 60.0
    refresh_s: float = 3600.0

    @property
    def enabled(self) -> bool:
        """False when watermarks are switched off (`interval_s: 0`)."""
        return self.interval_s > 0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The whole agent configuration, validated."""

    service: str
    module: str
    host: str
    state_file: Path
    inputs: tuple[InputConfig, ...]
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    limits: Limits = field(default_factory=Limits)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    start_at: str = "beginning"
    watermarks: WatermarkConfig = field(default_factory=WatermarkConfig)


_TOP_KEYS = {
    "service",
    "module",
    "host",
    "kafka",
    "state_file",
    "inputs",
    "limits",
    "metrics",
    "start_at",
    "one_line_per_record",
    "watermarks",
}
_KAFKA_KEYS = {
    "bootstrap_servers",
    "topic",
    "compression",
    "linger_ms",
    "max_record_bytes",
    "client",
    "security",
}
_INPUT_KEYS = {"paths", "module", "multiline", "one_line_per_record"}
_MULTILINE_KEYS = {"start", "max_lines", "timeout_ms"}
_LIMIT_KEYS = {
    "max_buffer_bytes",
    "max_line_bytes",
    "partial_line_timeout_ms",
    "shutdown_timeout_s",
    "checkpoint_interval_ms",
    "poll_interval_ms",
    "read_coalesce_ms",
    "read_coalesce_lines",
    "close_inactive_s",
    "max_open_files",
    "close_idle_s",
    "nice",
    "ionice",
}
_METRIC_KEYS = {"port", "log_interval_s", "host"}
_WATERMARK_KEYS = {"interval_s", "refresh_s"}
# Bounds of the watermark settings: more often than every 0.1 s would be a record per file per
# wake-up (a cost, no audit needs it); less often than daily, the audit could not tell an idle
# file from a lost agent for days.
WATERMARK_MIN_S = 0.1
WATERMARK_MAX_S = 86_400.0


def _address(raw: Any, where: str) -> str:
    """Return an IP address to bind to (a literal: a name could resolve to a public interface)."""
    try:
        return str(ipaddress.ip_address(str(raw)))
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)") from None


def _watermarks(raw: Any) -> WatermarkConfig:
    sec = _section(raw, "watermarks", _WATERMARK_KEYS)
    d = WatermarkConfig()
    interval = _float(sec.get("interval_s", d.interval_s), "watermarks.interval_s", 0)
    refresh = _float(sec.get("refresh_s", d.refresh_s), "watermarks.refresh_s", WATERMARK_MIN_S)
    for name, value in (("interval_s", interval), ("refresh_s", refresh)):
        if not value <= WATERMARK_MAX_S:  # NaN too (YAML's .nan passes a >= check)
            raise ConfigError(
                f"watermarks.{name}: must be at most {WATERMARK_MAX_S:.0f} s (a day), got {value}"
            )
    if 0 < interval < WATERMARK_MIN_S:
        raise ConfigError(f"watermarks.interval_s: must be 0 (off) or >= {WATERMARK_MIN_S}, got {interval}")
    if interval and refresh < interval:
        raise ConfigError(
            f"watermarks.refresh_s ({refresh}) must be at least watermarks.interval_s ({interval})"
        )
    return WatermarkConfig(interval_s=interval, refresh_s=refresh)


def _multiline(raw: Any, where: str) -> Multiline | None:
    if raw is None:
        return None
    sec = _section(raw, where, _MULTILINE_KEYS)
    if "start" not in sec:
        raise ConfigError(f"{where}.start: required")
    pattern = _str(sec["start"], f"{where}.start")
    try:
        start = re.compile(pattern.encode("utf-8", "surrogateescape"))
    except re.error as exc:
        raise ConfigError(f"{where}.start: invalid regular expression: {exc}") from None
    return Multiline(
        start=start,
        max_lines=_int(sec.get("max_lines", 500), f"{where}.max_lines", 1),
        timeout_ms=_int(sec.get("timeout_ms", 1000), f"{where}.timeout_ms", 1),
    )


def _paths(raw: Any, where: str) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a non-empty list of paths or globs")
    out = []
    for i, item in enumerate(items):
        path = _str(item, f"{where}[{i}]")
        if not os.path.isabs(path):
            raise ConfigError(f"{where}[{i}]: must be an absolute path, got {path!r}")
        out.append(path)
    return tuple(out)


def glob_base(pattern: str) -> Path:
    """Return the deepest wildcard-free directory of a glob.

    It is the directory the agent watches for the glob (inotify) and the log directory that
    the state file must stay out of. The one definition of a glob's watch folder: `parse`
    (the state file check) and fileset.py (the watched directories, and whether each glob's
    files sit directly in one) both use it, so the two can never disagree.
    """
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path("/")


ENV_OVERRIDES = {
    "KEPLERLOG_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "KEPLERLOG_TOPIC": ("kafka", "topic"),
    "KEPLERLOG_SERVICE": ("service",),
    "KEPLERLOG_MODULE": ("module",),
    "KEPLERLOG_HOST": ("host",),
    "KEPLERLOG_STATE_FILE": ("state_file",),
    "KEPLERLOG_METRICS_PORT": ("metrics", "port"),
    "KEPLERLOG_METRICS_HOST": ("metrics", "host"),
    "KEPLERLOG_WATERMARK_INTERVAL_S": ("watermarks", "interval_s"),
}


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay the KEPLERLOG_* environment variables (docs/interfaces.md) on the raw YAML.

    Empty variables are ignored; KEPLERLOG_INPUTS (comma-separated globs) replaces the inputs.
    """
    raw = overlay(raw, env, ENV_OVERRIDES)
    globs = [g.strip() for g in env.get("KEPLERLOG_INPUTS", "").split(",") if g.strip()]
    if globs:
        raw["inputs"] = [{"paths": globs}]
    return raw


def parse(raw: Any, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Validate a parsed YAML document (after environment overrides) into an AgentConfig."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("config: expected a mapping at the top level")
    raw = apply_env(dict(raw), os.environ if env is None else env)
    top = _section(raw, "config", _TOP_KEYS)
    if "service" not in top:
        raise ConfigError("service: required")
    service = _str(top["service"], "service")
    module = _str(top.get("module", service), "module")
    host = _str(top.get("host") or "", "host", empty=True) or socket.gethostname()
    if "state_file" not in top:
        raise ConfigError("state_file: required")
    state_file = Path(_str(top["state_file"], "state_file"))
    if not state_file.is_absolute():
        raise ConfigError(f"state_file: must be an absolute path, got {str(state_file)!r}")

    ksec = _section(top.get("kafka"), "kafka", _KAFKA_KEYS)
    kafka = KafkaConfig(
        bootstrap_servers=_str(ksec.get("bootstrap_servers", "localhost:9092"), "kafka.bootstrap_servers"),
        topic=_str(ksec.get("topic", "keplerlog"), "kafka.topic"),
        security=parse_security(ksec.get("security")),
        compression=_choice(ksec.get("compression", "lz4"), "kafka.compression", COMPRESSIONS),
        # unset (or null): replaced by the mode's default once the inputs are known
        linger_ms=_int(
            LINGER_MS_BATCHED if ksec.get("linger_ms") is None else ksec["linger_ms"],
            "kafka.linger_ms",
            0,
            10_000,
        ),
        max_record_bytes=_int(
            ksec.get("max_record_bytes", 900_000), "kafka.max_record_bytes", 1024, 64 * 1024 * 1024
        ),
        client=parse_client(ksec.get("client", "kafka-python")),
    )
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", kafka.topic):
        raise ConfigError(f"kafka.topic: invalid topic name {kafka.topic!r}")

    lsec = _section(top.get("limits"), "limits", _LIMIT_KEYS)
    d = Limits()
    limits = Limits(
        max_buffer_bytes=_int(
            lsec.get("max_buffer_bytes", d.max_buffer_bytes), "limits.max_buffer_bytes", 64 * 1024
        ),
        max_line_bytes=_int(lsec.get("max_line_bytes", d.max_line_bytes), "limits.max_line_bytes", 0)
        or kafka.max_record_bytes,
        partial_line_timeout_ms=_int(
            lsec.get("partial_line_timeout_ms", d.partial_line_timeout_ms),
            "limits.partial_line_timeout_ms",
            0,
        ),
        shutdown_timeout_s=_float(
            lsec.get("shutdown_timeout_s", d.shutdown_timeout_s), "limits.shutdown_timeout_s", 0
        ),
        checkpoint_interval_ms=_int(
            lsec.get("checkpoint_interval_ms", d.checkpoint_interval_ms), "limits.checkpoint_interval_ms", 10
        ),
        poll_interval_ms=_int(
            lsec.get("poll_interval_ms", d.poll_interval_ms), "limits.poll_interval_ms", 10, 60_000
        ),
        read_coalesce_ms=_int(
            lsec.get("read_coalesce_ms", d.read_coalesce_ms), "limits.read_coalesce_ms", 0, 10_000
        ),
        read_coalesce_lines=_int(
            lsec.get("read_coalesce_lines", d.read_coalesce_lines), "limits.read_coalesce_lines", 0, 1_000_000
        ),
        close_inactive_s=_float(
            lsec.get("close_inactive_s", d.close_inactive_s), "limits.close_inactive_s", 0
        ),
        max_open_files=_int(
            lsec.get("max_open_files", d.max_open_files), "limits.max_open_files", 1, 1_000_000
        ),
        close_idle_s=_float(lsec.get("close_idle_s", d.close_idle_s), "limits.close_idle_s", 0),
        nice=_int(lsec.get("nice", 0), "limits.nice", 0, 19),
        ionice=_choice(lsec.get("ionice", "none"), "limits.ionice", IONICE_CLASSES),
    )
    if limits.max_line_bytes > kafka.max_record_bytes:
        raise ConfigError(
            f"limits.max_line_bytes ({limits.max_line_bytes}) must not exceed "
            f"kafka.max_record_bytes ({kafka.max_record_bytes})"
        )
    if limits.max_buffer_bytes < kafka.max_record_bytes:
        raise ConfigError(
            f"limits.max_buffer_bytes ({limits.max_buffer_bytes}) must be at least "
            f"kafka.max_record_bytes ({kafka.max_record_bytes})"
        )

    msec = _section(top.get("metrics"), "metrics", _METRIC_KEYS)
    metrics = MetricsConfig(
        port=_int(msec.get("port", 0), "metrics.port", 0, 65535),
        log_interval_s=_float(msec.get("log_interval_s", 60), "metrics.log_interval_s", 0),
        host=_address(msec.get("host", "127.0.0.1"), "metrics.host"),
    )

    default_one = _bool(top.get("one_line_per_record", False), "one_line_per_record")
    raw_inputs = top.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError("inputs: required, a non-empty list")
    inputs = []
    for i, item in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        sec = _section(item, where, _INPUT_KEYS)
        if "paths" not in sec:
            raise ConfigError(f"{where}.paths: required")
        inputs.append(
            InputConfig(
                paths=_paths(sec["paths"], f"{where}.paths"),
                module=_str(sec.get("module", module), f"{where}.module"),
                multiline=_multiline(sec.get("multiline"), f"{where}.multiline"),
                one_line_per_record=_bool(
                    sec.get("one_line_per_record", default_one), f"{where}.one_line_per_record"
                ),
            )
        )

    if ksec.get("linger_ms") is None:
        kafka = replace(kafka, linger_ms=default_linger_ms(inputs))

    state_dir = Path(os.path.abspath(state_file.parent))
    for inp in inputs:
        for pattern in inp.paths:
            base = Path(os.path.abspath(glob_base(pattern)))
            if base != Path("/") and (state_dir == base or base in state_dir.parents):
                raise ConfigError(
                    f"state_file: {state_file} is inside the log directory {base}; keep it elsewhere"
                )

    return AgentConfig(
        service=service,
        module=module,
        host=host,
        state_file=state_file,
        inputs=tuple(inputs),
        kafka=kafka,
        limits=limits,
        metrics=metrics,
        start_at=_choice(top.get("start_at", "beginning"), "start_at", START_AT),
        watermarks=_watermarks(top.get("watermarks")),
    )


def default_linger_ms(inputs: Sequence[InputConfig]) -> int:
    """Return kafka.linger_ms for a config that does not set it.

    There is one producer for all inputs, so one input with one_line_per_record is enough to
    want producer-side batching; an explicit `kafka.linger_ms` always wins over this.
    """
    if any(inp.one_line_per_record for inp in inputs):
        return LINGER_MS_ONE_LINE_PER_RECORD
    return LINGER_MS_BATCHED


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate the YAML file at `path`; every failure is a one-line ConfigError."""
    return parse(read_yaml(path), env)

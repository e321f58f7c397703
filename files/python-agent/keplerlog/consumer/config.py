"""Consumer configuration: YAML file + environment overrides, validated up front.

Every problem becomes one ConfigError with a message naming the key, so that main() can print a
single clear line and exit 2 instead of failing later in the middle of a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from keplerlog.confkit import ConfigError, integer, number, overlay, read_yaml, section
from keplerlog.kafkaauth import KafkaSecurity, parse_client, parse_security
from keplerlog.layout import DEFAULT_LAYOUT, Layout, LayoutError
from keplerlog.names import name_problem

from .lines import LinePolicy

ENV_OVERRIDES = {
    "KEPLERLOG_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "KEPLERLOG_TOPIC": ("kafka", "topic"),
    "KEPLERLOG_GROUP_ID": ("kafka", "group_id"),
    "KEPLERLOG_ROOT": ("root",),
    "KEPLERLOG_METRICS_PORT": ("metrics", "port"),
}

_KAFKA_KEYS = {
    "bootstrap_servers",
    "topic",
    "group_id",
    "client_id",
    "session_timeout_ms",
    "max_poll_records",
    "fetch_max_bytes",
    "group_instance_id",
    "max_partition_fetch_bytes",
    "fetch_max_wait_ms",
    "auto_offset_reset",
    "security",
    "client",
}
_TOP_KEYS = {
    "kafka",
    "root",
    "layout",
    "timezone",
    "max_open_files",
    "idle_close_s",
    "legacy_service",
    "state_ttl_days",
    "metrics",
    "batch_max_bytes",
    "batch_max_wait_ms",
    "batch_idle_ms",
    "ts_max_age_days",
    "ts_max_ahead_s",
    "max_sources_per_partition",
    "lines",
}
_LINES_KEYS = {"max_line_bytes", "hold_s", "max_held_bytes"}
_METRICS_KEYS = {"port", "host", "log_interval_s"}


_DEFAULT = Layout(DEFAULT_LAYOUT)
_LINES = LinePolicy()


@dataclass(frozen=True)
class ConsumerConfig:
    """Validated consumer settings (defaults match docs/interfaces.md)."""

    bootstrap_servers: str
    root: str
    topic: str = "keplerlog"
    group_id: str = "keplerlog-consumer"
    client_id: str = "keplerlog-consumer"
    group_instance_id: str | None = None
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS / SASL (keplerlog.kafkaauth)
    client: str = "kafka-python"  # or librdkafka (rdclient.py)
    session_timeout_ms: int = 10000
    max_poll_records: int = 100000
    fetch_max_bytes: int = 64 * 1024 * 1024
    max_partition_fetch_bytes: int = 16 * 1024 * 1024
    # How long a broker may hold a fetch that finds no data. kafka-python keeps one fetch in flight
    # per broker and leaves out of it the partitions whose records poll() has not returned yet,
    # so new records of such a partition wait for that fetch of the others: up to this long.
    # The client's 500 ms showed as p99 350-440 ms end to end at 1k-50k lines/s (bench_latency).
    fetch_max_wait_ms: int = 100
    auto_offset_reset: str = "earliest"
    layout: Layout = _DEFAULT
    timezone: str = "UTC"
    max_open_files: int = 256
    idle_close_s: float = 60.0
    legacy_service: str = "legacy"
    state_ttl_days: float = 30.0
    ts_max_age_days: float = 30.0
    ts_max_ahead_s: float = 86400.0
    max_sources_per_partition: int = 100_000
    lines: LinePolicy = _LINES
    batch_max_bytes: int = 64 * 1024 * 1024
    batch_max_wait_ms: int = 100
    # A batch ends before batch_max_wait_ms when the consumer has caught up while the writer is
    # idle: a poll brought everything up to the high watermark, or a poll this long brought
    # nothing. Waiting would only add delay (at low and moderate rates most of the end-to-end
    # delay was this wait). Under load the consumer is behind or the writer busy, so batches
    # stay large. 0: always wait batch_max_wait_ms.
    batch_idle_ms: int = 5
    metrics_port: int = 9310
    metrics_host: str = "127.0.0.1"
    log_interval_s: float = 60.0

    @property
    def zone(self) -> ZoneInfo:
        """The time zone that decides which day file a line belongs to."""
        return ZoneInfo(self.timezone)


def _read(path: str | None) -> dict[str, Any]:
    """Read the YAML file into a mapping (empty without a file) and check its top-level keys."""
    loaded = read_yaml(path) if path else None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = loaded or {}
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}")
    return data


def _storage(top: dict[str, Any]) -> tuple[str, Layout, str]:
    """Root, layout and time zone: what the consumer writes and retention must recognise."""
    root = top.get("root")
    if not root or not isinstance(root, str) or not os.path.isabs(root):
        raise ConfigError("root: required, an absolute path (or KEPLERLOG_ROOT)")
    try:
        layout = Layout(str(top.get("layout", DEFAULT_LAYOUT)))
    except LayoutError as exc:
        raise ConfigError(f"layout: {exc}") from None
    timezone = str(top.get("timezone", "UTC"))
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone: unknown time zone {timezone!r}") from None
    return os.path.normpath(root), layout, timezone


def load_storage(path: str | None, env: dict[str, str] | None = None) -> tuple[str, Layout, str]:
    """Root, layout and time zone of a consumer.yml, for keplerlog-prune (no Kafka settings needed)."""
    env = dict(os.environ if env is None else env)
    return _storage(overlay(_read(path), env, {"KEPLERLOG_ROOT": ("root",)}))


def load_config(path: str | None, env: dict[str, str] | None = None) -> ConsumerConfig:
    """Read the YAML file (optional), apply KEPLERLOG_* overrides, validate everything."""
    env = dict(os.environ if env is None else env)
    top = overlay(_read(path), env, ENV_OVERRIDES)
    kafka = section(top.get("kafka"), "kafka", _KAFKA_KEYS)
    metrics = section(top.get("metrics"), "metrics", _METRICS_KEYS)
    lsec = section(top.get("lines"), "lines", _LINES_KEYS)

    bootstrap = kafka.get("bootstrap_servers")
    if isinstance(bootstrap, list):
        bootstrap = ",".join(str(b) for b in bootstrap)
    if not bootstrap or not isinstance(bootstrap, str):
        raise ConfigError("kafka.bootstrap_servers: required (or KEPLERLOG_BOOTSTRAP_SERVERS)")
    root, layout, timezone = _storage(top)
    legacy_service = str(top.get("legacy_service", "legacy"))
    problem = name_problem(legacy_service)
    if problem:
        raise ConfigError(f"legacy_service: {problem}")
    reset = str(kafka.get("auto_offset_reset", "earliest"))
    if reset not in ("earliest", "latest"):
        raise ConfigError("kafka.auto_offset_reset: earliest or latest")
    for key in ("topic", "group_id", "client_id"):
        if key in kafka and (not isinstance(kafka[key], str) or not kafka[key]):
            raise ConfigError(f"kafka.{key}: must be a non-empty string")
    return ConsumerConfig(
        bootstrap_servers=bootstrap,
        root=root,
        topic=kafka.get("topic", "keplerlog"),
        group_id=kafka.get("group_id", "keplerlog-consumer"),
        client_id=kafka.get("client_id", "keplerlog-consumer"),
        group_instance_id=str(kafka["group_instance_id"]) if kafka.get("group_instance_id") else None,
        security=parse_security(kafka.get("security")),
        client=parse_client(kafka.get("client", "kafka-python")),
        session_timeout_ms=integer(kafka.get("session_timeout_ms", 10000), "kafka.session_timeout_ms", 1000),
        max_poll_records=integer(kafka.get("max_poll_records", 100000), "kafka.max_poll_records", 1),
        fetch_max_bytes=integer(kafka.get("fetch_max_bytes", 64 << 20), "kafka.fetch_max_bytes", 1024),
        max_partition_fetch_bytes=integer(
            kafka.get("max_partition_fetch_bytes", 16 << 20), "kafka.max_partition_fetch_bytes", 1024
        ),
        fetch_max_wait_ms=integer(kafka.get("fetch_max_wait_ms", 100), "kafka.fetch_max_wait_ms", 1, 10_000),
        auto_offset_reset=reset,
        layout=layout,
        timezone=timezone,
        max_open_files=integer(top.get("max_open_files", 256), "max_open_files", 1),
        idle_close_s=number(top.get("idle_close_s", 60), "idle_close_s", 0),
        legacy_service=legacy_service,
        state_ttl_days=number(top.get("state_ttl_days", 30), "state_ttl_days", 0),
        ts_max_age_days=number(top.get("ts_max_age_days", 30), "ts_max_age_days", 0),
        ts_max_ahead_s=number(top.get("ts_max_ahead_s", 86400), "ts_max_ahead_s", 0),
        lines=LinePolicy(
            max_line_bytes=integer(lsec.get("max_line_bytes", 16 << 20), "lines.max_line_bytes", 1024),
            hold_s=number(lsec.get("hold_s", 60), "lines.hold_s", 0),
            max_held_bytes=integer(lsec.get("max_held_bytes", 64 << 20), "lines.max_held_bytes", 1024),
        ),
        max_sources_per_partition=integer(
            top.get("max_sources_per_partition", 100_000), "max_sources_per_partition", 1
        ),
        batch_max_bytes=integer(top.get("batch_max_bytes", 64 << 20), "batch_max_bytes", 1),
        batch_max_wait_ms=integer(top.get("batch_max_wait_ms", 100), "batch_max_wait_ms", 0),
        batch_idle_ms=integer(top.get("batch_idle_ms", 5), "batch_idle_ms", 0, 60_000),
        metrics_port=integer(metrics.get("port", 9310), "metrics.port", 0, 65535),
        metrics_host=str(metrics.get("host", "127.0.0.1")),
        log_interval_s=number(metrics.get("log_interval_s", 60), "metrics.log_interval_s", 0),
    )

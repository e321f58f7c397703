"""A consumer configuration for tests against the session's Kafka (shared by tests/ and tests/agent/)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from keplerlog.consumer.config import ConsumerConfig, load_config


def consumer_config(bootstrap: str, topic: str, root: Path, **overrides: Any) -> ConsumerConfig:
    """Return a consumer of `topic` into `root`: own group per topic, no metrics port, 6 s sessions."""
    cfg = load_config(
        None,
        {
            "KEPLERLOG_BOOTSTRAP_SERVERS": bootstrap,
            "KEPLERLOG_TOPIC": topic,
            "KEPLERLOG_GROUP_ID": f"g-{topic}",
            "KEPLERLOG_ROOT": str(root),
            "KEPLERLOG_METRICS_PORT": "0",
        },
    )
    return replace(cfg, session_timeout_ms=6000, **overrides)

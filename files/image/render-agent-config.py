#!/opt/keplerlog/bin/python
"""Render the agent's config (docs/interfaces.md) from the container's environment.

Runs at every container start, before supervisord. A config file that this script did not write
(for example one mounted with `-v my-agent.yml:/etc/keplerlog/agent.yml:ro`) is left alone.

Environment (the agent applies the KEPLERLOG_* overrides of docs/interfaces.md itself as well):
  KEPLERLOG_SERVICE            service name (image default: the build arg SERVICE_NAME); required
  KEPLERLOG_MODULE             module name (image default: MODULE_NAME)
  KEPLERLOG_HOST               host name in the records (default: the agent uses the container's)
  KEPLERLOG_BOOTSTRAP_SERVERS  Kafka bootstrap list (default kafka:9092)
  KEPLERLOG_TOPIC              topic (default keplerlog)
  KEPLERLOG_COMPRESSION        lz4 | zstd | gzip | none (default lz4)
  KEPLERLOG_INPUTS             comma-separated globs (default /app/{module}/logs/*.log)
  KEPLERLOG_MULTILINE_START    regex of an event's first line (default: a leading date); "" = off
  KEPLERLOG_STATE_FILE         default /var/lib/keplerlog/agent-state.json (never under the logs)
  KEPLERLOG_METRICS_PORT       Prometheus endpoint on KEPLERLOG_METRICS_HOST:port when > 0 (default 0)
  KEPLERLOG_METRICS_HOST       its address (default 127.0.0.1; 0.0.0.0 for a scraper on the
                               containers' network)
  KEPLERLOG_WATERMARK_INTERVAL_S  watermarks.interval_s (default: unset, the agent's 60 s; 0 off);
                               applied by the agent's own override, not written here
  KEPLERLOG_KAFKA_CLIENT       kafka.client: kafka-python | librdkafka (default: unset, the
                               agent's kafka-python; the image carries both, and the
                               service_image role sets librdkafka unless told otherwise)
  KEPLERLOG_LINGER_MS          kafka.linger_ms (default: unset, the agent picks it by mode)
  KEPLERLOG_MAX_BUFFER_BYTES   limits.max_buffer_bytes (default: unset, the agent's 3 MiB)
  KEPLERLOG_DRAIN_TIMEOUT      supervisord's stop wait for the agent (s); the agent's
                               limits.shutdown_timeout_s is 5 s less, so it checkpoints and
                               exits before supervisord's SIGKILL
  KEPLERLOG_KAFKA_SECURITY     kafka.security.protocol: plaintext (default) | ssl | sasl_ssl |
                               sasl_plaintext; the kafka role's secure cluster wants sasl_ssl
  KEPLERLOG_KAFKA_CAFILE       the cluster CA certificate (default /run/keplerlog/kafka-ca.crt:
                               entrypoint.sh copies it there from /run/secrets/keplerlog)
  KEPLERLOG_KAFKA_USERNAME     SCRAM user (default keplerlog-agent)
  KEPLERLOG_KAFKA_PASSWORD_FILE  its password, a file only the agent's user can read (default
                               /run/keplerlog/kafka.password: entrypoint.sh copies it there from
                               the read-only mount /run/secrets/keplerlog/kafka.password)
Unset tuning keys are left out of the file so that the agent's own defaults apply.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

MARKER = "# Rendered from the environment by render-agent-config.py at container start."


def env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def render() -> dict:
    module = env("KEPLERLOG_MODULE", env("MODULE_NAME", ""))
    service = env("KEPLERLOG_SERVICE", "")
    if not service or not module:
        sys.exit("render-agent-config: KEPLERLOG_SERVICE and KEPLERLOG_MODULE must be set")
    app_home = env("APP_HOME", f"/app/{module}")
    paths = [p.strip() for p in env("KEPLERLOG_INPUTS", f"{app_home}/logs/*.log").split(",") if p.strip()]
    state_file = env("KEPLERLOG_STATE_FILE", "/var/lib/keplerlog/agent-state.json")
    for pattern in paths:
        if Path(state_file).parent == Path(pattern).parent or state_file.startswith(f"{app_home}/logs/"):
            sys.exit(f"render-agent-config: state file {state_file} must not live in the log dir")
    inp: dict = {"paths": paths, "module": module}
    start = os.environ.get("KEPLERLOG_MULTILINE_START", r"^\d{4}-\d{2}-\d{2}")
    if start:
        inp["multiline"] = {"start": start, "max_lines": 500, "timeout_ms": 1000}
    kafka: dict = {
        "bootstrap_servers": env("KEPLERLOG_BOOTSTRAP_SERVERS", "kafka:9092"),
        "topic": env("KEPLERLOG_TOPIC", "keplerlog"),
        "compression": env("KEPLERLOG_COMPRESSION", "lz4"),
        "max_record_bytes": 900000,
    }
    security = render_security()
    if security:
        kafka["security"] = security
    limits: dict = {}  # max_line_bytes: the agent's default, as long as one record carries
    # Only when asked: the agent's defaults depend on the mode (linger) and were measured
    # (buffer, RSS), so a copy of them here would go stale.
    if env("KEPLERLOG_KAFKA_CLIENT", ""):
        kafka["client"] = env("KEPLERLOG_KAFKA_CLIENT", "")
    if env("KEPLERLOG_LINGER_MS", ""):
        kafka["linger_ms"] = int(env("KEPLERLOG_LINGER_MS", ""))
    if env("KEPLERLOG_MAX_BUFFER_BYTES", ""):
        limits["max_buffer_bytes"] = int(env("KEPLERLOG_MAX_BUFFER_BYTES", ""))
    if env("KEPLERLOG_DRAIN_TIMEOUT", ""):
        limits["shutdown_timeout_s"] = max(1, int(env("KEPLERLOG_DRAIN_TIMEOUT", "")) - 5)
    return {
        "service": service,
        "module": module,
        "host": env("KEPLERLOG_HOST", ""),
        "kafka": kafka,
        "state_file": state_file,
        "inputs": [inp],
        "limits": limits,
        "metrics": {
            "port": int(env("KEPLERLOG_METRICS_PORT", "0")),
            "host": env("KEPLERLOG_METRICS_HOST", "127.0.0.1"),
            "log_interval_s": 60,
        },
    }


def render_security() -> dict:
    """The `kafka.security` section (keplerlog/kafkaauth.py); empty for plaintext.

    Only file names go into the config: the password stays in its 0600 file, never in the
    environment, the config or a command line.
    """
    protocol = env("KEPLERLOG_KAFKA_SECURITY", "plaintext").lower()
    if protocol == "plaintext":
        return {}
    out: dict = {"protocol": protocol}
    if protocol in ("ssl", "sasl_ssl"):
        out["cafile"] = env("KEPLERLOG_KAFKA_CAFILE", "/run/keplerlog/kafka-ca.crt")
    if protocol in ("sasl_ssl", "sasl_plaintext"):
        out["username"] = env("KEPLERLOG_KAFKA_USERNAME", "keplerlog-agent")
        out["password_file"] = env("KEPLERLOG_KAFKA_PASSWORD_FILE", "/run/keplerlog/kafka.password")
    return out


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/keplerlog/agent.yml")
    if target.exists() and not target.read_text(errors="replace").startswith(MARKER):
        print(f"render-agent-config: keeping {target} (not rendered by this script)")
        return 0
    body = yaml.safe_dump(render(), sort_keys=False, default_flow_style=False)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(f"{MARKER}\n# Change the container's KEPLERLOG_* environment, not this file.\n{body}")
    tmp.chmod(0o644)
    os.replace(tmp, target)
    print(f"render-agent-config: wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

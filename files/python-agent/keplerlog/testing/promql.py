"""The series kepler-log's alert rules and Grafana dashboard read, for tests against real metrics.

`selectors()` lists the vector selectors of a PromQL expression (metric name and label matchers)
with a small lexer, no parser: enough to ask a live Prometheus for each selector and fail when one
returns nothing, i.e. when a rule or panel names a metric nobody exports. `concrete()` turns a
Grafana query into plain PromQL first. `rule_exprs()` / `dashboard_exprs()` read the shipped files;
`dashboard_problems()` and `alert_test_gaps()` are the structural checks of scripts/test-rules.sh.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

#: The metric names kepler-log's components export: the agent (job keplerlog_agent), the consumer
#: (job keplerlog_consumer), both with prometheus_client's process collector, the JMX exporter
#: rules of the brokers (job kafka), and Prometheus' own `up`. Alert rules and dashboard panels may
#: read these only (tests/test_promql.py checks the shipped ones). Keep it in sync with
#: keplerlog/agent/metrics.py, keplerlog/consumer/metrics.py and the JMX exporter configuration.
KNOWN_METRICS: frozenset[str] = frozenset(
    {
        # Prometheus, for every target
        "up",
        # prometheus_client's process collector (agent and consumer)
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        # agent counters
        "keplerlog_agent_lines_read_total",
        "keplerlog_agent_bytes_read_total",
        "keplerlog_agent_lines_sent_total",
        "keplerlog_agent_bytes_sent_total",
        "keplerlog_agent_records_sent_total",
        "keplerlog_agent_lines_acked_total",
        "keplerlog_agent_bytes_acked_total",
        "keplerlog_agent_records_acked_total",
        "keplerlog_agent_lines_split_total",
        "keplerlog_agent_send_errors_total",
        "keplerlog_agent_errors_total",
        "keplerlog_agent_rewinds_total",
        "keplerlog_agent_rotations_total",
        "keplerlog_agent_truncations_total",
        "keplerlog_agent_files_opened_total",
        "keplerlog_agent_files_closed_total",
        "keplerlog_agent_checkpoints_total",
        "keplerlog_agent_lost_bytes_total",
        "keplerlog_agent_fd_exhausted_total",
        "keplerlog_agent_producer_renewals_total",
        "keplerlog_agent_watermarks_sent_total",
        "keplerlog_agent_watermarks_failed_total",
        # agent gauges; file_* have labels path, file, module; paused has reason; info service, version
        "keplerlog_agent_inflight_bytes",
        "keplerlog_agent_files_open",
        "keplerlog_agent_files_open_limit",
        "keplerlog_agent_files_waiting",
        "keplerlog_agent_files_closed_known",
        "keplerlog_agent_kafka_connected",
        "keplerlog_agent_paused",
        "keplerlog_agent_info",
        "keplerlog_agent_file_lag_bytes",
        "keplerlog_agent_file_size_bytes",
        "keplerlog_agent_file_acked_bytes",
        # agent histograms
        "keplerlog_agent_ack_latency_seconds_bucket",
        "keplerlog_agent_ack_latency_seconds_sum",
        "keplerlog_agent_ack_latency_seconds_count",
        "keplerlog_agent_record_bytes_bucket",
        "keplerlog_agent_record_bytes_sum",
        "keplerlog_agent_record_bytes_count",
        # consumer counters; written_* have the labels service, module; quarantined_by_reason has reason
        "keplerlog_consumer_records_total",
        "keplerlog_consumer_bytes_total",
        "keplerlog_consumer_legacy_records_total",
        "keplerlog_consumer_duplicate_records_total",
        "keplerlog_consumer_duplicate_bytes_total",
        "keplerlog_consumer_partial_overlaps_total",
        "keplerlog_consumer_gaps_total",
        "keplerlog_consumer_gap_bytes_total",
        "keplerlog_consumer_gap_fills_total",
        "keplerlog_consumer_gap_fill_bytes_total",
        "keplerlog_consumer_gaps_given_up_total",
        "keplerlog_consumer_gap_bytes_given_up_total",
        "keplerlog_consumer_sources_evicted_total",
        "keplerlog_consumer_lines_joined_total",
        "keplerlog_consumer_lines_cut_total",
        "keplerlog_consumer_newlines_added_total",
        "keplerlog_consumer_unowned_records_total",
        "keplerlog_consumer_replaced_header_keys_total",
        "keplerlog_consumer_ts_out_of_range_total",
        "keplerlog_consumer_quarantined_total",
        "keplerlog_consumer_unsafe_names_total",
        "keplerlog_consumer_empty_records_total",
        "keplerlog_consumer_disk_full_total",
        "keplerlog_consumer_batches_total",
        "keplerlog_consumer_commit_failures_total",
        "keplerlog_consumer_connect_failures_total",
        "keplerlog_consumer_recovered_intents_total",
        "keplerlog_consumer_quarantined_by_reason_total",
        "keplerlog_consumer_written_bytes_total",
        "keplerlog_consumer_written_lines_total",
        # consumer completeness audit: watermarks reconciled (or skipped as read again), marks
        # evicted, report writes that failed
        "keplerlog_consumer_watermarks_total",
        "keplerlog_consumer_watermarks_replayed_total",
        "keplerlog_consumer_watermarks_late_total",
        "keplerlog_consumer_audit_marks_evicted_total",
        "keplerlog_consumer_audit_report_failures_total",
        # consumer gauges; lag_records has topic, partition; info has group, version
        "keplerlog_consumer_lag_records",
        "keplerlog_consumer_last_commit_timestamp_seconds",
        "keplerlog_consumer_open_files",
        "keplerlog_consumer_open_files_limit",
        "keplerlog_consumer_data_root_free_bytes",
        "keplerlog_consumer_data_root_size_bytes",
        "keplerlog_consumer_disk_full_paused",
        "keplerlog_consumer_info",
        # consumer audit gauges, per service and module (keplerlog/consumer/marks.py)
        "keplerlog_consumer_audit_missing_bytes",
        "keplerlog_consumer_audit_files_incomplete",
        "keplerlog_consumer_audit_source_lost_bytes",
        # consumer histograms
        "keplerlog_consumer_latency_seconds_bucket",
        "keplerlog_consumer_latency_seconds_sum",
        "keplerlog_consumer_latency_seconds_count",
        "keplerlog_consumer_fsync_seconds_bucket",
        "keplerlog_consumer_fsync_seconds_sum",
        "keplerlog_consumer_fsync_seconds_count",
        "keplerlog_consumer_batch_records_bucket",
        "keplerlog_consumer_batch_records_sum",
        "keplerlog_consumer_batch_records_count",
        # Kafka brokers' JMX exporter (job kafka); brokertopicmetrics_* have topic on per-topic series
        "kafka_server_replicamanager_underreplicatedpartitions",
        "kafka_server_replicamanager_partitioncount",
        "kafka_server_replicamanager_leadercount",
        "kafka_controller_kafkacontroller_offlinepartitionscount",
        "kafka_controller_kafkacontroller_activecontrollercount",
        "kafka_server_replicamanager_isrshrinks_total",
        "kafka_server_replicamanager_isrexpands_total",
        "kafka_server_brokertopicmetrics_bytesin_total",
        "kafka_server_brokertopicmetrics_bytesout_total",
        "kafka_server_brokertopicmetrics_messagesin_total",
        "kafka_network_requestmetrics_requests_total",
    }
)

# ------------------------------------------------------------------------------ Grafana -> PromQL

#: Grafana's interval variables and what they become (valid in a range and in an offset).
BUILTIN_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "5m",
    "__interval_ms": "60000",
    "__range_s": "300",
    "__range_ms": "300000",
}
#: What a template variable becomes inside a negative matcher: a value no label has, so the
#: matcher excludes nothing (as a variable excluding one real value excludes little).
NO_VALUE = "__none__"

_STRING = r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'" + r"|`[^`]*`"
_VARIABLE = (
    r"\$\{(?P<n1>[A-Za-z_]\w*)(?::[^}]*)?\}"  # ${name}, ${name:format}
    r"|\$(?P<n2>[A-Za-z_]\w*)"  # $name
    r"|\[\[(?P<n3>[A-Za-z_]\w*)(?::[^\]]*)?\]\]"  # [[name]], deprecated
)
_VARIABLE_RE = re.compile(_VARIABLE)
_CONCRETE_RE = re.compile(
    rf"(?P<label>[A-Za-z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>{_STRING})"
    rf"|(?P<string>{_STRING})"
    rf"|(?P<var>{_VARIABLE})"
)


def _variable_name(match: re.Match[str]) -> str:
    return match.group("n1") or match.group("n2") or match.group("n3")


def concrete(expr: str) -> str:
    """Return a Grafana panel query as plain PromQL, as if every variable were set to All.

    `$__rate_interval`, `$__interval` and `$__range` become 5m, 1m and 5m. A label matcher whose value
    holds a template variable (`$service`, `${service}`, `${service:regex}`, `[[service]]`) matches
    anything: `service="$service"` and `service=~"$service"` become `service=~".*"`; in negative
    matchers (`!=`, `!~`) the variable becomes "__none__". Strings that are not matcher values
    (label_replace's "$1") are left alone. Raises ValueError for a variable anywhere else.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("string") is not None:
            return match.group(0)
        if match.group("var") is not None:
            name = _variable_name(match)
            if name not in BUILTIN_VARIABLES:
                raise ValueError(f"template variable ${name} outside a label matcher in {expr!r}")
            return BUILTIN_VARIABLES[name]
        value = match.group("value")
        if not _VARIABLE_RE.search(value):
            return match.group(0)
        label, op, quote, body = match.group("label"), match.group("op"), value[0], value[1:-1]
        if op in ("=", "=~"):
            return f"{label}=~{quote}{_VARIABLE_RE.sub('.*', body)}{quote}"
        return f"{label}{op}{quote}{_VARIABLE_RE.sub(NO_VALUE, body)}{quote}"

    return _CONCRETE_RE.sub(replace, expr)


# ------------------------------------------------------------------------------ selectors

_TOKEN_RE = re.compile(
    rf"(?P<space>\s+|\#[^\n]*)"
    rf"|(?P<string>{_STRING})"
    r"|(?P<range>\[[^\]]*\])"  # [5m], [1h:1m]: never holds a selector
    r"|(?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w:.])"
    r"|(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[A-Za-z_:][\w:]*)"
    r"|(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=,(){}@])"
)
#: Keywords followed by a parenthesised label list, which names labels, not series.
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN_RE.match(expr, pos)
        if match is None:
            raise ValueError(f"unexpected {expr[pos]!r} at {pos} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group(0)))
        pos = match.end()
    return out


def _after_parens(tokens: list[tuple[str, str]], start: int, expr: str) -> int:
    """Index after the `)` that closes the `(` at `start`."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] == ("op", "("):
            depth += 1
        elif tokens[i] == ("op", ")"):
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def _matchers(tokens: list[tuple[str, str]], start: int, expr: str) -> tuple[list[str], int]:
    """Return the matchers of the `{...}` at `start` as `label op "value"`, and the index after `}`."""
    out: list[str] = []
    i = start + 1
    while i < len(tokens) and tokens[i] != ("op", "}"):
        if out:
            if tokens[i] != ("op", ","):
                raise ValueError(f"expected , or }} after {out[-1]!r} in {expr!r}")
            i += 1
            if i < len(tokens) and tokens[i] == ("op", "}"):
                break
        part = tokens[i : i + 3]
        if (
            len(part) < 3
            or part[0][0] not in ("ident", "string")
            or part[1] not in {("op", o) for o in _MATCH_OPS}
            or part[2][0] != "string"
        ):
            raise ValueError(f"bad label matcher near {tokens[i][1]!r} in {expr!r}")
        out.append("".join(text for _, text in part))
        i += 3
    if i >= len(tokens):
        raise ValueError(f"unclosed {{ in {expr!r}")
    return out, i + 1


def selectors(expr: str) -> list[str]:
    """Return the vector selectors `expr` reads, in order, each once.

    A selector is the metric name with its `{...}` matchers if it has any (as `name{a="b",c=~"d"}`,
    without range, offset or @), or `{...}` alone. Function and aggregation names, `by`/`without`/
    `on`/`ignoring`/`group_left`/`group_right` label lists, operators, keywords, numbers, durations
    and strings are skipped, so `time()` and `vector(1)` read nothing. Raises ValueError on text
    that is not PromQL (an unknown character, unbalanced brackets, a malformed matcher).
    """
    tokens = _tokens(expr)
    depth = 0
    for token in tokens:
        depth += {("op", "("): 1, ("op", ")"): -1}.get(token, 0)
        if depth < 0:
            break
    if depth:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident":
            word = text.lower()
            if word in _LABEL_LIST_KEYWORDS:
                i = _after_parens(tokens, i + 1, expr) if following == ("op", "(") else i + 1
                continue
            if word in _KEYWORDS or word in _AGGREGATIONS or following == ("op", "("):
                i += 1
                continue
            matchers: list[str] = []
            i += 1
            if following == ("op", "{"):
                matchers, i = _matchers(tokens, i, expr)
            selector = text + ("{" + ",".join(matchers) + "}" if matchers else "")
        elif (kind, text) == ("op", "{"):
            matchers, i = _matchers(tokens, i, expr)
            if not matchers:
                raise ValueError(f"empty selector {{}} in {expr!r}")
            selector = "{" + ",".join(matchers) + "}"
        else:
            i += 1
            continue
        if selector not in out:
            out.append(selector)
    return out


def metric_name(selector: str) -> str | None:
    """Return the metric name of a `selectors()` item: its leading name or its `__name__="..."`."""
    if not selector.startswith("{"):
        return selector.split("{", 1)[0]
    match = re.search(r"""__name__=(["'`])(.*?)\1(?:,|\})""", selector)
    return match.group(2) if match else None


# ------------------------------------------------------------------------------ shipped files


def rule_exprs(rules_yaml_path: str | Path) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule of a Prometheus rules file, in file order."""
    doc = yaml.safe_load(Path(rules_yaml_path).read_text(encoding="utf-8")) or {}
    return [
        (str(rule.get("alert") or rule.get("record")), str(rule["expr"]))
        for group in doc.get("groups") or []
        for rule in group.get("rules") or []
    ]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def _load_dashboard(json_path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{json_path}: not a JSON object")
    return doc


def dashboard_exprs(json_path: str | Path) -> list[tuple[str, str]]:
    """("panel title [refId]", concrete(expr)) of every panel target of a Grafana dashboard."""
    return [
        (f"{panel.get('title', '?')} [{target.get('refId', '?')}]", concrete(str(target["expr"])))
        for panel in _panels(_load_dashboard(json_path).get("panels") or [])
        for target in panel.get("targets") or []
        if "expr" in target
    ]


_DATASOURCE_UIDS = ("${DS_PROMETHEUS}", "$DS_PROMETHEUS")
_VARIABLE_METRIC = "keplerlog_consumer_written_bytes_total"


def dashboard_problems(json_path: str | Path) -> list[str]:
    """Return what is wrong with a kepler-log dashboard file (nothing when it is fine).

    Checks: valid JSON with uid, title, schemaVersion and panels; a `DS_PROMETHEUS` datasource
    variable of type prometheus and the query variables `service` and `module`; unique panel ids;
    every panel but rows reads the `${DS_PROMETHEUS}` datasource and has targets, each with a
    unique refId and an expr that `concrete()` and `selectors()` accept and that reads a series.
    """
    try:
        doc = _load_dashboard(json_path)
    except (OSError, ValueError) as exc:
        return [f"{json_path}: {exc}"]
    problems = [
        f"missing top-level {key!r}" for key in ("uid", "title", "schemaVersion", "panels") if key not in doc
    ]
    variables = {v.get("name"): v for v in (doc.get("templating") or {}).get("list") or []}
    ds = variables.get("DS_PROMETHEUS") or {}
    if (ds.get("type"), ds.get("query")) != ("datasource", "prometheus"):
        problems.append("templating needs DS_PROMETHEUS, a datasource variable of type prometheus")
    for name in ("service", "module"):
        var = variables.get(name) or {}
        if var.get("type") != "query" or _VARIABLE_METRIC not in json.dumps(var.get("query")):
            problems.append(f"templating needs {name}, a query variable on {_VARIABLE_METRIC}")
    ids: set[Any] = set()
    for panel in _panels(doc.get("panels") or []):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") not in _DATASOURCE_UIDS:
            problems.append(f"panel {title!r}: datasource is not ${{DS_PROMETHEUS}}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"panel {title!r}: refIds missing or repeated: {ref_ids}")
        for target in targets:
            where = f"panel {title!r} [{target.get('refId')}]"
            if not target.get("expr"):
                problems.append(f"{where}: no expr")
                continue
            try:
                if not selectors(concrete(target["expr"])):
                    problems.append(f"{where}: reads no series")
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def alert_test_gaps(rules_yaml_path: str | Path, tests_yaml_path: str | Path) -> list[str]:
    """Alerts of a rules file without a promtool test case where they fire and one where they do not."""
    tests = yaml.safe_load(Path(tests_yaml_path).read_text(encoding="utf-8")) or {}
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in tests.get("tests") or []:
        for case in test.get("alert_rule_test") or []:
            (fires if case.get("exp_alerts") else quiet).add(str(case.get("alertname")))
    problems = []
    doc = yaml.safe_load(Path(rules_yaml_path).read_text(encoding="utf-8")) or {}
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            if "alert" not in rule:
                continue
            name = str(rule["alert"])
            problems += [f"{name}: no test case where it fires"] if name not in fires else []
            problems += [f"{name}: no test case where it stays quiet"] if name not in quiet else []
    return problems

"""keplerlog.testing.promql: Grafana -> PromQL, selector extraction, and the shipped rules and dashboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keplerlog.testing.promql import (
    KNOWN_METRICS,
    alert_test_gaps,
    concrete,
    dashboard_exprs,
    dashboard_problems,
    metric_name,
    rule_exprs,
    selectors,
)

FILES = Path(__file__).resolve().parents[2]
RULES = FILES.parent / "roles" / "prometheus" / "files" / "keplerlog.rules.yml"
RULE_TESTS = FILES.parent / "roles" / "prometheus" / "files" / "tests" / "keplerlog.rules.test.yml"
DASHBOARD = FILES / "grafana" / "keplerlog-pipeline.json"


# ------------------------------------------------------------------------------ concrete


@pytest.mark.parametrize(
    ("grafana", "promql"),
    [
        ("rate(x[$__rate_interval])", "rate(x[5m])"),
        ("rate(x[${__rate_interval}])", "rate(x[5m])"),
        ("increase(x[$__interval]) offset $__interval", "increase(x[1m]) offset 1m"),
        ("sum_over_time(x[$__range])", "sum_over_time(x[5m])"),
        ("x / $__range_s", "x / 300"),
        ('x{service=~"$service"}', 'x{service=~".*"}'),
        ('x{service="$service"}', 'x{service=~".*"}'),
        ('x{service=~"${service}"}', 'x{service=~".*"}'),
        ('x{service=~"${service:regex}", module=~"[[module]]"}', 'x{service=~".*", module=~".*"}'),
        ('x{ service = "$service" }', 'x{ service=~".*" }'),
        ('x{service=~"api|$service"}', 'x{service=~"api|.*"}'),
        ('x{service!="$service"}', 'x{service!="__none__"}'),
        ('x{service!~"$service"}', 'x{service!~"__none__"}'),
        ("x{service='$service'}", "x{service=~'.*'}"),
        ('x{job="kafka"}', 'x{job="kafka"}'),
        # Not matcher values: label_replace's $1 and a literal dollar stay as they are.
        ('label_replace(x, "dst", "$1", "src", "(.*)")', 'label_replace(x, "dst", "$1", "src", "(.*)")'),
        ('x{path="/var/$log"}', 'x{path=~"/var/.*"}'),
        ('x{price="$5"}', 'x{price="$5"}'),
    ],
)
def test_concrete(grafana, promql):
    assert concrete(grafana) == promql


def test_concrete_refuses_a_variable_outside_a_matcher():
    with pytest.raises(ValueError, match=r"\$top"):
        concrete("topk($top, x)")


# ------------------------------------------------------------------------------ selectors


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(keplerlog_consumer_latency_seconds_bucket{job="x"}[5m]))) > 4',
            ['keplerlog_consumer_latency_seconds_bucket{job="x"}'],
        ),
        ("up", ["up"]),
        ('up{job="kafka"} == 0', ['up{job="kafka"}']),
        ("up{}", ["up"]),
        ('{__name__="up", job="kafka"}', ['{__name__="up",job="kafka"}']),
        ('up{job="a",}', ['up{job="a"}']),
        ("up{job='a', instance=~`b.*`}", ["up{job='a',instance=~`b.*`}"]),
        # aggregation label lists, before and after the arguments
        ("sum by (job, instance) (a)", ["a"]),
        ("sum(a) without (instance)", ["a"]),
        ("SUM BY (le) (a) AND ON (job) b", ["a", "b"]),
        ('count_values("version", keplerlog_agent_info)', ["keplerlog_agent_info"]),
        ("topk(5, a) or bottomk(3, b)", ["a", "b"]),
        ("quantile(0.9, a)", ["a"]),
        # vector matching
        ("a * on (job, instance) group_left (service) b", ["a", "b"]),
        ("a / ignoring (le) group_right c", ["a", "c"]),
        ("a and on () b", ["a", "b"]),
        ("a unless ignoring(x) b", ["a", "b"]),
        ("a > bool 3", ["a"]),
        ("a atan2 b", ["a", "b"]),
        # ranges, subqueries, offsets, @
        ("rate(a[5m] offset 1h)", ["a"]),
        ("rate(a[5m] offset -30s)", ["a"]),
        ("max_over_time(deriv(a[5m])[1h:1m])", ["a"]),
        ("a @ 1609746000", ["a"]),
        ("rate(a[5m] @ end())", ["a"]),
        ("a offset 1h30m", ["a"]),
        # numbers, strings and constants read nothing
        ("time()", []),
        ("vector(1)", []),
        ("time() - a > 300", ["a"]),
        ("1e3 * a + 0x1f - .5 + 2.5e-3", ["a"]),
        ("a > Inf or b < -inf or c != NaN", ["a", "b", "c"]),
        ("scalar(a) * 2", ["a"]),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', ["up"]),
        ('absent(up{job="a"}) or absent(up{job="b"})', ['up{job="a"}', 'up{job="b"}']),
        # each selector once, in order; recording rule names have colons
        ("increase(a[1d]) unless increase(a[30m])", ["a"]),
        ("keplerlog:latency:p99 > 4", ["keplerlog:latency:p99"]),
        # label names that are keywords or function names are labels, not series
        ('a{on="x", by="y", sum="z"}', ['a{on="x",by="y",sum="z"}']),
        ('a{le="+Inf"}', ['a{le="+Inf"}']),
        # a string with braces and brackets inside
        ('a{path="/x/{y}[z]"}', ['a{path="/x/{y}[z]"}']),
        ("a # comment b\n+ c", ["a", "c"]),
    ],
)
def test_selectors(expr, expected):
    assert selectors(expr) == expected


@pytest.mark.parametrize(
    "expr",
    ['up{job="a"', "sum by (job (up)", "up{job=}", "up{job}", "{}", "up ; down", 'up{job="a" instance="b"}'],
)
def test_selectors_refuse_what_is_not_promql(expr):
    with pytest.raises(ValueError):
        selectors(expr)


@pytest.mark.parametrize(
    ("selector", "name"),
    [
        ("up", "up"),
        ('up{job="a"}', "up"),
        ('{__name__="up",job="a"}', "up"),
        ('{job="a",__name__="up"}', "up"),
        ('{__name__=~"up|x"}', None),
        ('{job="a"}', None),
    ],
)
def test_metric_name(selector, name):
    assert metric_name(selector) == name


# ------------------------------------------------------------------------------ file readers


def test_rule_exprs_reads_alerts_and_records(tmp_path):
    rules = tmp_path / "r.yml"
    rules.write_text(
        "groups:\n"
        "  - name: a\n"
        "    rules:\n"
        "      - record: keplerlog:x:rate5m\n"
        "        expr: sum(rate(x[5m]))\n"
        "  - name: b\n"
        "    rules:\n"
        "      - alert: XHigh\n"
        "        expr: |\n"
        "          keplerlog:x:rate5m > 1\n"
    )
    assert rule_exprs(rules) == [
        ("keplerlog:x:rate5m", "sum(rate(x[5m]))"),
        ("XHigh", "keplerlog:x:rate5m > 1\n"),
    ]


def _dashboard(panels):
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    var_query = 'label_values(keplerlog_consumer_written_bytes_total{service=~"$service"}, module)'
    return {
        "uid": "u",
        "title": "t",
        "schemaVersion": 39,
        "templating": {
            "list": [
                {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus"},
                {"name": "service", "type": "query", "datasource": ds, "query": var_query},
                {"name": "module", "type": "query", "datasource": ds, "query": {"query": var_query}},
            ]
        },
        "panels": panels,
    }


def _panel(pid, title, *targets):
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    return {"id": pid, "type": "timeseries", "title": title, "datasource": ds, "targets": list(targets)}


def test_dashboard_exprs_are_concrete_and_include_collapsed_rows(tmp_path):
    path = tmp_path / "d.json"
    row = {"id": 2, "type": "row", "title": "r", "collapsed": True}
    row["panels"] = [_panel(3, "inner", {"refId": "A", "expr": "rate(b[$__rate_interval])"})]
    doc = _dashboard([_panel(1, "top", {"refId": "A", "expr": 'a{service=~"$service"}'}), row])
    path.write_text(json.dumps(doc))
    assert dashboard_exprs(path) == [("top [A]", 'a{service=~".*"}'), ("inner [A]", "rate(b[5m])")]
    assert dashboard_problems(path) == []


def test_dashboard_problems_finds_what_is_wrong(tmp_path):
    path = tmp_path / "d.json"
    doc = _dashboard(
        [
            _panel(1, "no expr", {"refId": "A"}),
            _panel(1, "same id, same refId", {"refId": "A", "expr": "a"}, {"refId": "A", "expr": "b"}),
            _panel(3, "constant", {"refId": "A", "expr": "vector(1)"}),
            _panel(4, "broken", {"refId": "A", "expr": "rate(a[5m]"}),
            _panel(5, "no targets"),
            {**_panel(6, "other datasource", {"refId": "A", "expr": "a"}), "datasource": {"uid": "prom"}},
        ]
    )
    doc["templating"]["list"] = doc["templating"]["list"][:2]
    path.write_text(json.dumps(doc))
    problems = "\n".join(dashboard_problems(path))
    for needle in (
        "'no expr' [A]: no expr",
        "duplicate id 1",
        "refIds missing or repeated",
        "'constant' [A]: reads no series",
        "'broken' [A]: unbalanced parentheses",
        "'no targets': no targets",
        "'other datasource': datasource",
        "templating needs module",
    ):
        assert needle in problems
    path.write_text("{not json")
    assert dashboard_problems(path)[0].startswith(str(path))


def test_alert_test_gaps(tmp_path):
    rules = tmp_path / "r.yml"
    rules.write_text(
        "groups:\n  - name: g\n    rules:\n"
        "      - record: r\n        expr: a\n"
        "      - alert: Both\n        expr: a > 1\n"
        "      - alert: OnlyFires\n        expr: a > 2\n"
        "      - alert: Never\n        expr: a > 3\n"
    )
    tests = tmp_path / "t.yml"
    tests.write_text(
        "tests:\n  - alert_rule_test:\n"
        "      - {alertname: Both, exp_alerts: []}\n"
        "      - {alertname: Both, exp_alerts: [{exp_labels: {}}]}\n"
        "      - {alertname: OnlyFires, exp_alerts: [{exp_labels: {}}]}\n"
    )
    assert alert_test_gaps(rules, tests) == [
        "OnlyFires: no test case where it stays quiet",
        "Never: no test case where it fires",
        "Never: no test case where it stays quiet",
    ]


# ------------------------------------------------------------------------------ the shipped files


def _recorded() -> set[str]:
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_shipped_expressions_read_only_known_metrics(source):
    exprs = rule_exprs(RULES) if source == "rules" else dashboard_exprs(DASHBOARD)
    assert len(exprs) >= 20
    known = KNOWN_METRICS | _recorded()
    for name, expr in exprs:
        found = selectors(expr)
        assert found, f"{name}: reads no series: {expr}"
        unknown = [s for s in found if metric_name(s) not in known]
        assert not unknown, f"{name}: metrics nobody exports: {unknown}"


def test_shipped_alerts_have_the_expected_shape():
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    assert [g["name"] for g in doc["groups"]] == [
        "keplerlog-agent",
        "keplerlog-consumer",
        "kafka",
        "keplerlog-pipeline",
    ]
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), alert["alert"]
    for record in (r for g in doc["groups"] for r in g["rules"] if "record" in r):
        assert record["record"].startswith("keplerlog:")


def test_every_shipped_alert_has_a_firing_and_a_quiet_promtool_case():
    assert alert_test_gaps(RULES, RULE_TESTS) == []


def test_shipped_dashboard():
    assert dashboard_problems(DASHBOARD) == []
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    for name in ("service", "module"):
        assert variables[name]["definition"].startswith("label_values(keplerlog_consumer_written_bytes_total")
    exprs = " ".join(expr for _, expr in dashboard_exprs(DASHBOARD))
    # The panels the pipeline's on-call needs, by what they read.
    for metric in (
        "keplerlog_consumer_written_lines_total",
        "keplerlog_consumer_written_bytes_total",
        "keplerlog_agent_lines_acked_total",
        "keplerlog_consumer_latency_seconds_bucket",
        "keplerlog_consumer_lag_records",
        "keplerlog_agent_file_lag_bytes",
        "keplerlog_consumer_quarantined_total",
        "keplerlog_consumer_gap_bytes_total",
        "keplerlog_consumer_unsafe_names_total",
        "keplerlog_agent_lost_bytes_total",
        "keplerlog_agent_send_errors_total",
        "keplerlog_agent_producer_renewals_total",
        "keplerlog_consumer_data_root_free_bytes",
        "keplerlog_consumer_disk_full_paused",
        "kafka_server_replicamanager_underreplicatedpartitions",
        "kafka_controller_kafkacontroller_offlinepartitionscount",
        "kafka_controller_kafkacontroller_activecontrollercount",
        "kafka_server_replicamanager_isrshrinks_total",
        "kafka_server_replicamanager_isrexpands_total",
        "kafka_server_brokertopicmetrics_bytesin_total",
        "kafka_server_brokertopicmetrics_bytesout_total",
        "keplerlog_agent_kafka_connected",
        "keplerlog_agent_paused",
        "up",
    ):
        assert metric in exprs, metric


def test_the_catalog_matches_what_the_agent_and_the_consumer_export(tmp_path):
    """KNOWN_METRICS (what rules and panels may read) against the real registries: a name the
    code stopped exporting, or never did, fails here before it fails against a live Prometheus."""
    import re as _re

    from keplerlog.agent.metrics import AgentMetrics, Counters, FileGauge, Snapshot
    from keplerlog.consumer.app import ConsumerApp
    from keplerlog.consumer.config import load_config

    files = [FileGauge("/l/a.log", "id", "web", 10, 5)]
    snapshot = Snapshot(
        "shop",
        files,
        {
            "inflight_bytes": 0,
            "files_open": 1,
            "files_open_limit": 64,
            "files_waiting": 0,
            "files_closed_known": 0,
            "kafka_connected": 1,
        },
        {"memory": False, "kafka": False},
    )
    agent = AgentMetrics(Counters(), lambda: snapshot).render().decode()
    # the consumer as it starts: every gauge a rule reads must exist before any event sets it
    cfg = load_config(None, {"KEPLERLOG_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KEPLERLOG_ROOT": str(tmp_path)})
    consumer_metrics = ConsumerApp(cfg).metrics
    consumer = consumer_metrics.render()
    exported = set()
    for text in (agent, consumer):
        exported |= set(_re.findall(r"^# TYPE (\S+)", text, _re.M))
        # OpenMetrics names a counter family without `_total`; its series (what rules read) have it
        exported |= {f"{n}_total" for n in _re.findall(r"^# TYPE (\S+) counter$", text, _re.M)}
        exported |= {m.split("{")[0] for m in _re.findall(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ", text, _re.M)}
    ours = {n for n in KNOWN_METRICS if n.startswith(("keplerlog_agent_", "keplerlog_consumer_", "process_"))}
    missing = sorted(
        n for n in ours if n not in exported and _re.sub(r"_(bucket|sum|count)$", "", n) not in exported
    )
    assert not missing, f"in the catalog, not exported: {missing}"

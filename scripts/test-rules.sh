#!/usr/bin/env bash
# Checks kepler-log's monitoring files without a running Prometheus or Grafana (`make test-rules`):
#   roles/prometheus/files/keplerlog.rules.yml  promtool check rules
#   roles/prometheus/files/tests/*.test.yml     promtool test rules, and every alert has a case
#                                               where it fires and one where it stays quiet
#   files/grafana/keplerlog-pipeline.json       structure (keplerlog.testing.promql), and the
#                                               PromQL of every panel target: each becomes a
#                                               recording rule of a temporary file that promtool
#                                               checks
# Rules and panels may only read metrics of keplerlog.testing.promql.KNOWN_METRICS (or the
# rules file's own recording rules).
# Needs promtool (Debian package prometheus) and the venv (make venv). Prints one summary line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rules="$root/roles/prometheus/files/keplerlog.rules.yml"
tests="$root/roles/prometheus/files/tests/keplerlog.rules.test.yml"
dashboard="$root/files/grafana/keplerlog-pipeline.json"
py="$root/.venv/bin/python"

fail() { echo "test-rules: FAILED: $*" >&2; exit 1; }

command -v promtool >/dev/null \
  || fail "promtool not found: install the Debian package prometheus (apt-get install prometheus)"
[[ -x "$py" ]] || fail "$py not found: run make venv"

# Runs a command quietly; on failure shows its output and stops.
run() {
  local what=$1 out
  shift
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    fail "$what"
  fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run "promtool check rules ${rules#"$root/"}" promtool check rules "$rules"
run "promtool test rules ${tests#"$root/"}" promtool test rules "$tests"

# Structure of the dashboard and the test file; writes the counts and the dashboard's queries as
# a rules file (one recording rule per panel target, concrete() PromQL) for promtool.
run "dashboard, metric catalog and test coverage checks" env PYTHONPATH="$root/files/python-agent" "$py" - \
  "$rules" "$tests" "$dashboard" "$tmp/dashboard.rules.yml" "$tmp/counts" <<'EOF'
import re
import sys

import yaml

from keplerlog.testing.promql import (
    KNOWN_METRICS,
    alert_test_gaps,
    dashboard_exprs,
    dashboard_problems,
    metric_name,
    rule_exprs,
    selectors,
)

rules, tests, dashboard, out, counts = sys.argv[1:]
problems = [f"{dashboard}: {p}" for p in dashboard_problems(dashboard)]
problems += [f"{tests}: {p}" for p in alert_test_gaps(rules, tests)]
if problems:
    sys.exit("\n".join(problems))
doc = yaml.safe_load(open(rules, encoding="utf-8"))
recorded = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
for path, exprs in ((rules, rule_exprs(rules)), (dashboard, dashboard_exprs(dashboard))):
    for name, expr in exprs:
        unknown = [s for s in selectors(expr) if metric_name(s) not in KNOWN_METRICS | recorded]
        if unknown:
            problems.append(f"{path}: {name}: metrics not in KNOWN_METRICS (keplerlog/testing/promql.py): {unknown}")
if problems:
    sys.exit("\n".join(problems))
queries = dashboard_exprs(dashboard)
group = {
    "name": "dashboard-queries",
    "rules": [
        # The record name says which panel a promtool error is about: panel title, refId, number.
        {"record": "keplerlog_dashboard:" + re.sub(r"\W+", "_", f"{name}_{i}").strip("_").lower(), "expr": expr}
        for i, (name, expr) in enumerate(queries, 1)
    ],
}
with open(out, "w", encoding="utf-8") as f:
    yaml.safe_dump({"groups": [group]}, f, sort_keys=False, width=1000)
cases = yaml.safe_load(open(tests, encoding="utf-8"))["tests"]
n_cases = sum(len(t.get("alert_rule_test") or []) + len(t.get("promql_expr_test") or []) for t in cases)
alerts = sum(1 for g in doc["groups"] for r in g["rules"] if "alert" in r)
with open(counts, "w", encoding="utf-8") as f:
    f.write(f"{len(rule_exprs(rules))} {alerts} {len(cases)} {n_cases} {len(queries)}\n")
EOF
run "promtool check rules on the dashboard's queries (one recording rule per panel target)" \
  promtool check rules "$tmp/dashboard.rules.yml"

read -r n_rules n_alerts n_tests n_cases n_queries < "$tmp/counts"
echo "test-rules: OK: $n_rules rules ($n_alerts alerts) checked, $n_tests promtool tests ($n_cases cases) passed," \
  "$n_queries dashboard queries checked"

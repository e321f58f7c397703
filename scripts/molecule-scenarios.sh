#!/usr/bin/env bash
# Runs Molecule scenarios one by one and prints a summary: `molecule-scenarios.sh [-s NAME]...`.
# With no -s, every scenario under molecule/ runs (alphabetical, as `molecule test --all`).
#
# Unlike `molecule test --all`, a failed scenario does not hide the ones after it: each later
# scenario still runs (every scenario destroys its own containers first and last), so one CI run
# shows every failure. The summary names each scenario with its result and wall time, and the
# exit status is non-zero when any failed. A CI log is often read from its end only: under the
# summary, each failed scenario's failing tests, assertion lines and fatal tasks are printed again
# (from its full output, kept in $MOLECULE_LOG_DIR, by default a fresh temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
molecule=${MOLECULE:-.venv/bin/molecule}
scenarios=()
while (($#)); do
  case $1 in
    -s | --scenario-name)
      scenarios+=("$2")
      shift 2
      ;;
    --all) shift ;;
    *)
      echo "molecule-scenarios: unknown argument '$1' (use -s NAME)" >&2
      exit 2
      ;;
  esac
done
if ((${#scenarios[@]} == 0)); then
  for f in molecule/*/molecule.yml; do
    d=${f%/molecule.yml}
    scenarios+=("${d#molecule/}")
  done
fi
for s in "${scenarios[@]}"; do
  if [[ ! -f molecule/$s/molecule.yml ]]; then
    echo "molecule-scenarios: no scenario '$s' (molecule/$s/molecule.yml)" >&2
    exit 2
  fi
done
logs=${MOLECULE_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/molecule-logs.XXXXXX")}
# Without a terminal, molecule and the pytest it runs wrap at 80 columns: an assertion's message
# (the agents' stats, the counts) ends up cut into pieces that the summary below cannot show whole.
export COLUMNS=${COLUMNS:-200}
mkdir -p "$logs"
results=()
failed_names=()
failed=0
for s in "${scenarios[@]}"; do
  echo "== scenario ${s}: start"
  start=$(date +%s)
  "$molecule" test -s "$s" 2>&1 | tee "$logs/$s.log"
  rc=${PIPESTATUS[0]}
  took=$(($(date +%s) - start))
  if ((rc == 0)); then
    results+=("  ${s}: passed (${took}s)")
  else
    results+=("  ${s}: FAILED, exit ${rc} (${took}s)")
    failed_names+=("$s")
    failed=$((failed + 1))
  fi
  echo "== scenario ${s}: exit ${rc} after ${took}s"
done
echo "== molecule scenarios:"
printf '%s\n' "${results[@]}"
for s in "${failed_names[@]}"; do
  echo "== why ${s} failed (the matching lines of $logs/$s.log):"
  plain=$(sed -E 's/\x1b\[[0-9;]*m//g' "$logs/$s.log")
  # the assertions and fatal tasks first, then pytest's one line per failed test (with the
  # first line of its message) last: a log cut to its last lines still names them
  grep -aE '[│|] E  |^E  |fatal: \[' <<<"$plain" | tail -n 40
  grep -aE '\b(FAILED|ERROR)\b|[0-9]+ (passed|failed)' <<<"$plain" | grep -av '[│|] E  |^E  ' | tail -n 20
done
echo "scenarios: $((${#scenarios[@]} - failed)) passed, ${failed} failed"
exit $((failed > 0))

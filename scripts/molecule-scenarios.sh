#!/usr/bin/env bash
# Runs Molecule scenarios one by one and prints a summary: `molecule-scenarios.sh [-s NAME]...`.
# With no -s, every scenario under molecule/ runs (alphabetical, as `molecule test --all`).
#
# Unlike `molecule test --all`, a failed scenario does not hide the ones after it: each later
# scenario still runs (every scenario destroys its own containers first and last), so one CI run
# shows every failure. The summary names each scenario with its result and wall time, and the
# exit status is non-zero when any failed.
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
results=()
failed=0
for s in "${scenarios[@]}"; do
  echo "== scenario ${s}: start"
  start=$(date +%s)
  "$molecule" test -s "$s"
  rc=$?
  took=$(($(date +%s) - start))
  if ((rc == 0)); then
    results+=("  ${s}: passed (${took}s)")
  else
    results+=("  ${s}: FAILED, exit ${rc} (${took}s)")
    failed=$((failed + 1))
  fi
  echo "== scenario ${s}: exit ${rc} after ${took}s"
done
echo "== molecule scenarios:"
printf '%s\n' "${results[@]}"
echo "scenarios: $((${#scenarios[@]} - failed)) passed, ${failed} failed"
exit $((failed > 0))

#!/usr/bin/env bash
# Runs a command and prints how long it took: `timed.sh PHASE cmd args...`.
# CI reads these lines to report the wall time of each phase.
set -uo pipefail
phase=$1
shift
start=$(date +%s)
"$@"
rc=$?
echo "== phase ${phase}: $(( $(date +%s) - start ))s (exit ${rc})"
exit $rc

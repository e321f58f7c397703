#!/usr/bin/env bash
# Installs the Debian packages the toolchain needs on the controller, only those missing:
# Docker engine, debootstrap (base images), Maven + JDK 17 (Kafka distribution), kcat and
# logrotate (tests and benchmarks), promtool (the alert rules' unit tests: Debian's prometheus).
# Harmless where everything is present; needs root otherwise.
set -euo pipefail
declare -A want=(
  [docker]=docker.io [debootstrap]=debootstrap [mvn]=maven [javac]=openjdk-17-jdk-headless
  [kcat]=kcat [logrotate]=logrotate [python3]=python3 [taskset]=util-linux [promtool]=prometheus
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("${want[$cmd]}")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if ((${#missing[@]} == 0)); then
  echo "system-deps: all present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "system-deps: missing ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null

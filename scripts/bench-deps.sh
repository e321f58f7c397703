#!/usr/bin/env bash
# Installs what `make bench` compares kepler-log with, only what is missing (idempotent):
#   - Debian packages kcat, rsyslog, rsyslog-kafka (imfile + omkafka), linux-perf (the agent's
#     profile, bench_profile.py) — needs root;
#   - Apache Flume NG jars from Maven Central into dist/peers/flume/lib (never committed),
#     resolved from bench/peers/flume/pom.xml and refreshed when that pom changes;
#   - matplotlib into .venv (plots only; not a runtime dependency, so not in requirements.txt).
#   - py-spy into .venv (the consumer part's profile; likewise not a runtime dependency).
# A peer that cannot be installed is reported and skipped by the benchmark, so this script
# warns instead of failing when one part is unavailable.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rc=0

# --- Debian packages -------------------------------------------------------------------------
missing=()
for pkg in kcat rsyslog rsyslog-kafka linux-perf; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  echo "bench-deps: Debian packages present (kcat rsyslog rsyslog-kafka linux-perf)"
elif [[ $(id -u) -ne 0 ]]; then
  echo "bench-deps: missing ${missing[*]}; as root: apt-get install ${missing[*]}" >&2
  rc=1
else
  echo "bench-deps: installing ${missing[*]}"
  # The benchmark runs its own rsyslogd in the foreground: keep the package's system service
  # from starting on install (a policy-rc.d is only added, and removed, if none exists).
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "bench-deps: apt-get install ${missing[*]} failed" >&2; rc=1; }
  ((added_policy)) && rm -f "$policy"
fi

# --- Apache Flume NG -------------------------------------------------------------------------
pom="$root/bench/peers/flume/pom.xml"
lib="$root/dist/peers/flume/lib"
stamp="$lib/.pom.sha256"
want=$(sha256sum "$pom" | cut -d' ' -f1)
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "bench-deps: Flume jars present in dist/peers/flume/lib"
elif ! command -v mvn >/dev/null || ! command -v java >/dev/null; then
  echo "bench-deps: mvn and java are needed for the Flume peer (make system-deps)" >&2
  rc=1
else
  echo "bench-deps: resolving Flume NG into dist/peers/flume/lib"
  tmp="$lib.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  if mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp"; then
    rm -rf "$lib" && mv "$tmp" "$lib" && echo "$want" >"$stamp"
    echo "bench-deps: $(find "$lib" -name '*.jar' | wc -l) Flume jars"
  else
    rm -rf "$tmp"
    echo "bench-deps: Flume resolution failed" >&2
    rc=1
  fi
fi

# --- matplotlib (plots) ----------------------------------------------------------------------
py="$root/.venv/bin/python"
if [[ ! -x $py ]]; then
  echo "bench-deps: no .venv yet (make venv); plots will be skipped" >&2
elif "$py" -c 'import matplotlib' 2>/dev/null; then
  echo "bench-deps: matplotlib present"
else
  echo "bench-deps: installing matplotlib into .venv"
  "$py" -m pip install -q matplotlib || echo "bench-deps: matplotlib install failed; plots will be skipped" >&2
fi
# --- py-spy (the consumer's profile, bench_consumer.py --profile) -----------------------------
if [[ -x $py ]] && [[ ! -x $root/.venv/bin/py-spy ]]; then
  echo "bench-deps: installing py-spy into .venv"
  "$py" -m pip install -q py-spy || echo "bench-deps: py-spy install failed; no consumer profile" >&2
fi
exit $rc

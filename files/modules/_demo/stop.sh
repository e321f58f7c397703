#!/bin/sh
# Stops a demo module started by start.sh (shared by the demo modules, each links it): SIGTERM to
# the pid in run/{module}.pid, then waits
# up to STOP_TIMEOUT seconds (default 15) for it to log its last line and exit, then SIGKILL.
# Exit 0 when it is not running.
set -eu
APP_HOME=$(cd "$(dirname "$0")" && pwd)
MODULE_NAME=""
# shellcheck disable=SC1091
. "$APP_HOME/module.env"
APP_NAME=$MODULE_NAME
pidfile="$APP_HOME/run/$APP_NAME.pid"
timeout=${STOP_TIMEOUT:-15}
[ -f "$pidfile" ] || { echo "$APP_NAME: not running (no pid file)"; exit 0; }
pid=$(cat "$pidfile")
if ! kill -0 "$pid" 2>/dev/null; then
  rm -f "$pidfile"
  exit 0
fi
echo "$APP_NAME: stopping pid $pid"
kill -TERM "$pid"
i=0
while kill -0 "$pid" 2>/dev/null; do
  i=$((i + 1))
  if [ "$i" -gt $((timeout * 10)) ]; then
    echo "$APP_NAME: still running after ${timeout}s, killing pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
    break
  fi
  sleep 0.1
done
rm -f "$pidfile"
echo "$APP_NAME: stopped"

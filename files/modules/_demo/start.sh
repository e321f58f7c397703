#!/bin/sh
# Starts a demo module in the foreground (original contract: start.sh starts, stop.sh stops).
# Shared by the demo modules (each links it): the module is the directory it is started from,
# named by MODULE_NAME in its module.env. supervisord (in the image) or a terminal keeps it
# attached; it writes its pid to run/{module}.pid for stop.sh and logs only to
# logs/{module}.log (rotated by its own log framework).
# Tunables (environment): LOG_RATE (lines/s, default DEMO_LOG_RATE from module.env), LOG_MAX_BYTES,
# LOG_BACKUPS, LOG_TRACE_EVERY.
set -eu
APP_HOME=$(cd "$(dirname "$0")" && pwd)
MODULE_NAME=""
DEMO_LOG_RATE=20
# shellcheck disable=SC1091
. "$APP_HOME/module.env"
APP_NAME=$MODULE_NAME
export APP_NAME APP_HOME
: "${LOG_RATE:=$DEMO_LOG_RATE}"
: "${LOG_MAX_BYTES:=10485760}"
: "${LOG_BACKUPS:=10}"
export LOG_RATE LOG_MAX_BYTES LOG_BACKUPS
mkdir -p "$APP_HOME/logs" "$APP_HOME/run"
echo "$$" >"$APP_HOME/run/$APP_NAME.pid"
echo "$APP_NAME: starting (pid $$, LOG_RATE=$LOG_RATE/s, logs in $APP_HOME/logs)"
exec python3 "$APP_HOME/bin/logdemo.py"

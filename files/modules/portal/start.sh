#!/bin/sh
# Starts the portal service in the foreground (original contract: start.sh starts, stop.sh stops).
# supervisord (in the image) or a terminal keeps it attached; it writes its pid to run/portal.pid
# for stop.sh and logs only to logs/portal.log (rotated by its own log framework).
# Tunables (environment): LOG_RATE (lines/s, default 20), LOG_MAX_BYTES, LOG_BACKUPS, LOG_TRACE_EVERY.
set -eu
APP_NAME=portal
APP_HOME=$(cd "$(dirname "$0")" && pwd)
export APP_NAME APP_HOME
: "${LOG_RATE:=20}"
: "${LOG_MAX_BYTES:=10485760}"
: "${LOG_BACKUPS:=10}"
export LOG_RATE LOG_MAX_BYTES LOG_BACKUPS
mkdir -p "$APP_HOME/logs" "$APP_HOME/run"
echo "$$" >"$APP_HOME/run/$APP_NAME.pid"
echo "$APP_NAME: starting (pid $$, LOG_RATE=$LOG_RATE/s, logs in $APP_HOME/logs)"
exec python3 "$APP_HOME/bin/logdemo.py"

#!/bin/sh
# Entry point of kepler-log service images: renders /etc/keplerlog/agent.yml from the environment,
# prepares the state and log directories, then runs CMD (supervisord as PID 1 by default).
# `docker run IMAGE bash` gets a shell with the same preparation.
set -eu
: "${APP_STOP_TIMEOUT:=20}"
: "${KEPLERLOG_DRAIN_TIMEOUT:=30}"
# stop.sh's own limit (STOP_TIMEOUT) ends a little before supervisord's SIGKILL (APP_STOP_TIMEOUT)
: "${STOP_TIMEOUT:=$((APP_STOP_TIMEOUT > 5 ? APP_STOP_TIMEOUT - 3 : APP_STOP_TIMEOUT))}"
export APP_STOP_TIMEOUT KEPLERLOG_DRAIN_TIMEOUT STOP_TIMEOUT

state_dir=$(dirname "${KEPLERLOG_STATE_FILE:-/var/lib/keplerlog/agent-state.json}")
mkdir -p "$state_dir" /etc/keplerlog
# a bind mount may arrive owned by root: the agent runs as keplerlog
chown keplerlog:keplerlog "$state_dir"
mkdir -p "$APP_HOME/logs" "$APP_HOME/run"
chown app:app "$APP_HOME/logs" "$APP_HOME/run"

# The Kafka secrets arrive as a read-only mount that only the docker host's root may enter; the
# agent runs as keplerlog and accepts only a password file no one else can read: private copies
# on /run (the CA certificate is public, the password 0600).
if [ -d /run/secrets/keplerlog ]; then
  install -d -m 0700 -o keplerlog -g keplerlog /run/keplerlog
  if [ -f /run/secrets/keplerlog/kafka-ca.crt ]; then
    install -m 0644 -o keplerlog -g keplerlog /run/secrets/keplerlog/kafka-ca.crt /run/keplerlog/kafka-ca.crt
  fi
  if [ -f /run/secrets/keplerlog/kafka.password ]; then
    install -m 0600 -o keplerlog -g keplerlog /run/secrets/keplerlog/kafka.password /run/keplerlog/kafka.password
  fi
fi

/opt/keplerlog/bin/python /usr/local/lib/keplerlog/render-agent-config.py /etc/keplerlog/agent.yml
# Rendered into agent.yml (with the multiline settings): the agent's own KEPLERLOG_INPUTS override
# would replace the inputs without them.
unset KEPLERLOG_INPUTS KEPLERLOG_MULTILINE_START
exec "$@"

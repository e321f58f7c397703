#!/bin/bash
# supervisord's [program:app]: keeps the module's original start.sh/stop.sh contract.
# Runs $APP_HOME/start.sh in the foreground (start.sh execs the application). When supervisord
# stops the program (SIGTERM, or SIGINT), runs $APP_HOME/stop.sh, which stops the application
# gracefully; without a stop.sh, the signal is forwarded to start.sh's process instead.
# Exits with the application's exit status, so supervisord sees crashes and restarts them.
set -u
cd "${APP_HOME:?}"
./start.sh &
child=$!

on_stop() {
  trap '' TERM INT
  if [ -x ./stop.sh ]; then
    ./stop.sh || kill -TERM "$child" 2>/dev/null
  else
    kill -TERM "$child" 2>/dev/null
  fi
}
trap on_stop TERM INT

# `wait` returns early when a trapped signal arrives: wait again until the child is gone.
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child"
exit $?

#!/usr/bin/env bash
# Makes sure a Docker engine answers. Does nothing where one already does (a developer laptop);
# on a fresh Debian machine, as root, installs Debian's docker.io and starts dockerd in the
# background, logging to /var/log/keplerlog-dockerd.log, then waits until `docker info` answers.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  echo "docker-bootstrap: a Docker engine already answers"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "docker-bootstrap: no Docker engine answers and we are not root; start Docker yourself" >&2
  exit 1
fi
if ! command -v dockerd >/dev/null; then
  echo "docker-bootstrap: installing docker.io"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  echo "docker-bootstrap: starting dockerd"
  nohup dockerd >/var/log/keplerlog-dockerd.log 2>&1 &
fi
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "docker-bootstrap: Docker engine is up"
    exit 0
  fi
  sleep 1
done
echo "docker-bootstrap: dockerd did not answer within 60 s; see /var/log/keplerlog-dockerd.log" >&2
exit 1

#!/usr/bin/env bash
# The local lab: `demo.sh up` creates (or reuses) systemd containers for three Kafka nodes,
# two consumer hosts sharing one data root (.lab/central) and a Prometheus on the docker
# network kl-lab-net, deploys the whole pipeline onto them with
# `ansible-playbook site.yml -i inventories/local` (the docker host being this machine, which
# builds the service images and runs the two demo services), then shows the result.
# `demo.sh down` removes the lab. Central files land in .lab/central on this machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
NET=kl-lab-net
IMAGE=${SYSTEMD_IMAGE:-keplerlog/debian-systemd:12}
HOSTS=(kl-lab-kafka-1 kl-lab-kafka-2 kl-lab-kafka-3 kl-lab-consumer kl-lab-consumer-2 kl-lab-prometheus)
SERVICES=(kl-lab-portal kl-lab-billing)
CENTRAL="$root/.lab/central"
export ANSIBLE_CONFIG="$root/ansible.cfg"
PATH="$root/.venv/bin:$PATH"

start_host() {
  local name=$1
  shift
  if [[ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" == true ]]; then
    return
  fi
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker run -d --name "$name" --hostname "$name" --network "$NET" \
    --cap-add SYS_ADMIN --security-opt seccomp=unconfined --cgroupns=host \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock "$@" \
    "$IMAGE" /lib/systemd/systemd >/dev/null
  echo "demo: started $name"
}

wait_systemd() {
  local name
  for name in "${HOSTS[@]}"; do
    for _ in $(seq 1 60); do
      state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
      [[ "$state" == running || "$state" == degraded ]] && break
      sleep 1
    done
  done
}

show() {
  echo
  echo "== kepler-log lab is up"
  echo "central files (host): $CENTRAL   (consumer hosts kl-lab-consumer{,-2}:/srv/keplerlog, shared)"
  find "$CENTRAL" -type f -not -path '*/.keplerlog/*' -printf '   %P  %s bytes\n' 2>/dev/null | sort | head -20
  local f
  for f in $(find "$CENTRAL" -type f -not -path '*/.keplerlog/*' -not -path '*/_quarantine/*' 2>/dev/null | sort | head -4); do
    echo "-- last lines of ${f#"$CENTRAL"/}"
    tail -n 3 "$f" | cut -c1-160
  done
  echo "-- live view (make status; WATCH=5 keeps it open)"
  # the first minute's rates need two scrapes of every target: wait for the agents' acks
  for _ in $(seq 1 18); do
    "$root/.venv/bin/python" scripts/status.py 2>/dev/null | grep -qE 'acked by Kafka +[0-9]' && break
    sleep 5
  done
  "$root/.venv/bin/python" scripts/status.py || true
  echo
  echo "-- completeness audit of today (keplerlog-audit; the agents send a watermark every 10 s here)"
  local day
  day=$(date +%Y%m%d)
  for _ in $(seq 1 12); do
    compgen -G "$CENTRAL/.keplerlog/audit/$day/*.json" >/dev/null && break
    sleep 5
  done
  "$root/.venv/bin/keplerlog-audit" --root "$CENTRAL" --day "$day" || true
  echo
  echo "Kafka: kl-lab-kafka-{1,2,3}:9092 (SASL_SSL, SCRAM; CA .lab/pki/kafka-ca/ca.crt, passwords .lab/secrets)"
  echo "Prometheus: http://$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' kl-lab-prometheus):9090" \
    "(alert rules loaded; dashboard: files/grafana/keplerlog-pipeline.json)"
  echo "services: ${SERVICES[*]}   live view: make status WATCH=5   down: make demo-down"
}

up() {
  docker network inspect "$NET" >/dev/null 2>&1 || docker network create "$NET" >/dev/null
  mkdir -p "$CENTRAL"
  for h in kl-lab-kafka-1 kl-lab-kafka-2 kl-lab-kafka-3; do start_host "$h"; done
  start_host kl-lab-consumer -v "$CENTRAL:/srv/keplerlog"
  start_host kl-lab-consumer-2 -v "$CENTRAL:/srv/keplerlog"  # same root: one group, shared files
  start_host kl-lab-prometheus
  wait_systemd
  ansible-playbook site.yml -i inventories/local
  sleep 10
  show
}

down() {
  docker rm -f "${SERVICES[@]}" "${HOSTS[@]}" >/dev/null 2>&1 || true
  local svc
  for svc in "${SERVICES[@]}"; do
    docker volume rm "$svc-state" "$svc-logs" >/dev/null 2>&1 || true
  done
  docker network rm "$NET" >/dev/null 2>&1 || true
  rm -rf "$root/.lab"
  echo "demo: lab removed"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  show) show ;;
  *) echo "usage: $0 up|down|show" >&2; exit 2 ;;
esac

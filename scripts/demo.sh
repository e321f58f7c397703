#!/usr/bin/env bash
# The local lab: `demo.sh up` creates (or reuses) systemd containers for three Kafka nodes and
# two consumer hosts sharing one data root (.lab/central) on the docker network kl-lab-net, deploys the whole pipeline onto them with
# `ansible-playbook site.yml -i inventories/local` (the docker host being this machine, which
# builds the service images and runs the two demo services), then shows the result.
# `demo.sh down` removes the lab. Central files land in .lab/central on this machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
NET=kl-lab-net
IMAGE=${SYSTEMD_IMAGE:-keplerlog/debian-systemd:12}
HOSTS=(kl-lab-kafka-1 kl-lab-kafka-2 kl-lab-kafka-3 kl-lab-consumer kl-lab-consumer-2)
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

metric() {
  # One value from the consumers' Prometheus endpoints (summed over both hosts; latency: the
  # larger), read from inside their containers.
  local host values=()
  for host in kl-lab-consumer kl-lab-consumer-2; do
    values+=("$(docker exec "$host" python3 -c '
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9310/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(sys.argv[1] + " "):
        print(line.split()[-1])
' "$1" 2>/dev/null || true)")
  done
  python3 -c '
import sys
name, vals = sys.argv[1], [float(v) for v in sys.argv[2:] if v.strip()]
if not vals:
    print("?")
elif "latency" in name:
    print(f"{max(vals):.3f}")
else:
    print(int(sum(vals)))
' "$1" "${values[@]}"
}

central_lines() {
  find "$CENTRAL" -type f -not -path '*/.keplerlog/*' -not -path '*/_quarantine/*' -print0 2>/dev/null \
    | xargs -0 -r cat | wc -l
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
  echo "-- live counters (over 10 s)"
  local l0 l1 r0 r1
  l0=$(central_lines)
  r0=$(metric keplerlog_consumer_records_total)
  sleep 10
  l1=$(central_lines)
  r1=$(metric keplerlog_consumer_records_total)
  echo "   lines/s shipped into central files: $(( (l1 - l0) / 10 ))   records/s: $(( (${r1%.*} - ${r0%.*}) / 10 ))"
  echo "   end-to-end latency p50: $(metric 'keplerlog_consumer_latency_seconds{quantile="0.5"}') s" \
    " p99: $(metric 'keplerlog_consumer_latency_seconds{quantile="0.99"}') s (recent records)"
  echo "   duplicates dropped: $(metric keplerlog_consumer_duplicate_records_total)" \
    "  gaps: $(metric keplerlog_consumer_gaps_total)  quarantined: $(metric keplerlog_consumer_quarantined_total)"
  echo "   consumer lag per partition:"
  # as the node's admin identity: TLS with its certificate to the INTERNAL listener
  docker exec kl-lab-kafka-1 kafka-class org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server kl-lab-kafka-1:9094 --command-config /etc/kafka/admin-client.properties \
    --describe --group keplerlog-consumer 2>/dev/null \
    | awk '$1 == "GROUP" || $1 == "keplerlog-consumer" { printf "     %-10s %-10s %-15s %-15s %s\n", $2, $3, $4, $5, $6 }' || true
  echo
  echo "Kafka: kl-lab-kafka-{1,2,3}:9092 (SASL_SSL, SCRAM; CA .lab/pki/kafka-ca/ca.crt, passwords .lab/secrets)"
  echo "services: ${SERVICES[*]}   down: make demo-down"
}

up() {
  docker network inspect "$NET" >/dev/null 2>&1 || docker network create "$NET" >/dev/null
  mkdir -p "$CENTRAL"
  for h in kl-lab-kafka-1 kl-lab-kafka-2 kl-lab-kafka-3; do start_host "$h"; done
  start_host kl-lab-consumer -v "$CENTRAL:/srv/keplerlog"
  start_host kl-lab-consumer-2 -v "$CENTRAL:/srv/keplerlog"  # same root: one group, shared files
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

#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: a head and N worker nodes,
# each its own `ray start` (own raylet, object store and ports), token auth on.
#
#   cluster/local.sh start      # WORKERS=1 CPUS_PER_NODE=2 by default
#                               # ports: RAY_GCS_PORT (6390), RAY_DASHBOARD_PORT (8266),
#                               # RAY_DASHBOARD_AGENT_PORT (52365), RAY_CLIENT_PORT (10001),
#                               # WORKER_PORT_BASE (20000), SERVE_PORT (8000, only printed)
#   cluster/local.sh status
#   cluster/local.sh stop
#
# `start` prints the two variables a client needs (`ray job submit`, the Python
# JobSubmissionClient, `ray status`): RAY_ADDRESS and RAY_AUTH_TOKEN.
set -euo pipefail

cmd=${1:-start}
workers=${WORKERS:-1}
cpus=${CPUS_PER_NODE:-2}
gcs_port=${RAY_GCS_PORT:-6390}
dashboard_port=${RAY_DASHBOARD_PORT:-8266}
serve_port=${SERVE_PORT:-8000}
# Ports a second Ray on this machine (a test session's, a laptop's `ray start`)
# also binds by default: override them to run beside it.
agent_port=${RAY_DASHBOARD_AGENT_PORT:-52365}
client_port=${RAY_CLIENT_PORT:-10001}
worker_base=${WORKER_PORT_BASE:-20000}  # worker node i uses ports worker_base + i*1000 + 1..999
host=127.0.0.1
export RAY_AUTH_MODE=token
token_file="${HOME}/.ray/auth_token"
# Our own temp dir: every process of this cluster carries it on its command
# line, so `stop` can end exactly these (`ray stop` would end every Ray here).
temp_dir="/tmp/gr-cluster-$gcs_port"

case "$cmd" in
  start)
    if [[ ! -s "$token_file" ]]; then
      ray get-auth-token --generate >/dev/null
    fi
    export RAY_AUTH_TOKEN="$(cat "$token_file")"
    ray start --head --node-ip-address="$host" --port="$gcs_port" --num-cpus="$cpus" \
      --include-dashboard=true --dashboard-host="$host" --dashboard-port="$dashboard_port" \
      --dashboard-agent-listen-port="$agent_port" --ray-client-server-port="$client_port" \
      --temp-dir="$temp_dir" --disable-usage-stats >/dev/null
    for i in $(seq 1 "$workers"); do
      # Distinct ports per node: several raylets share this host.
      base=$((worker_base + i * 1000))
      ray start --address="$host:$gcs_port" --node-ip-address="$host" --num-cpus="$cpus" \
        --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) \
        --dashboard-agent-listen-port=$((base + 3)) \
        --min-worker-port=$((base + 100)) --max-worker-port=$((base + 999)) \
        --disable-usage-stats >/dev/null
    done
    # Wait until every node has registered.
    for _ in $(seq 1 120); do
      n=$(python - "$host:$gcs_port" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
      [[ "$n" -ge $((workers + 1)) ]] && break
      sleep 1
    done
    echo "RAY_ADDRESS=http://$host:$dashboard_port"
    echo "RAY_GCS_ADDRESS=$host:$gcs_port"
    echo "RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN"
    echo "SERVE_URL=http://$host:$serve_port"
    ;;
  status)
    ray status --address="$host:$gcs_port"
    ;;
  stop)
    # GCS, raylets, dashboard and monitors carry the temp dir or the GCS port
    # on their command line; workers exit when their raylet goes.
    pkill -TERM -f -- "$temp_dir" || true
    pkill -TERM -f -- "--address=[0-9.]*:$gcs_port" || true
    sleep 2
    pkill -KILL -f -- "$temp_dir" || true
    # Do not leave a bare ray.init() pointed at a cluster that is gone.
    for f in /tmp/ray/ray_current_cluster "$temp_dir/ray_current_cluster"; do
      if [[ "$(cat "$f" 2>/dev/null)" == *":$gcs_port" ]]; then rm -f "$f"; fi
    done
    echo "stopped"
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac

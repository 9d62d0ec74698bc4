#!/usr/bin/env bash
# A multi-node-like Ray cluster on this machine: a head plus N worker nodes (separate raylets),
# for trying the cluster workflow and for CI. The same `ray job submit` commands then work as
# on a real cluster, with --no-use-gpu: a run that joins a cluster asks for GPUs by default, and
# this one has CPUs only (and no autoscaler to add GPU nodes).
#
#   cluster/local.sh up [--workers N] [--cpus-per-node C] [--head-cpus H]
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   ray job submit --working-dir . -- python jobs/train.py --arch distillation --no-use-gpu --out /abs/path/runs ...
#   (every node of this cluster is this machine: an absolute local --out is one folder they share)
#   cluster/local.sh status
#   cluster/local.sh down     # `ray stop --force`: every Ray instance of this machine, not only this cluster's
#
# Environment exported before `up` (e.g. AWS_ENDPOINT_URL and credentials for S3/MinIO) is seen
# by every job. Ports: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265).
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
# a local test cluster needs no token authentication (stack facts: otherwise the CLI is refused)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0

cmd=${1:-}
shift || true
workers=2
cpus=1
head_cpus=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --cpus-per-node) cpus=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

case "$cmd" in
  up)
    if ! command -v ray >/dev/null; then
      echo "error: 'ray' not found; install with: pip install -e '.[cluster]'" >&2
      exit 2
    fi
    ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
      --dashboard-port="$DASHBOARD_PORT" --num-cpus="$head_cpus" --resources='{"streetmtl_trials": 1000}' \
      --disable-usage-stats >/dev/null  # (sweeps' trials wait on the head: mtl.distributed.tune.TRIAL_RESOURCE)
    for i in $(seq 1 "$workers"); do
      # a temp dir per node, as on separate machines: nodes sharing one would unpack (and clean
      # up) each job's working_dir in the same place, under each other's feet
      ray start --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
        --temp-dir="${TMPDIR:-/tmp}/ray-node-$RAY_PORT-$i" --disable-usage-stats >/dev/null
    done
    # wait until the dashboard (job server) answers and every node has joined
    for _ in $(seq 1 60); do
      nodes=$(python - "$RAY_PORT" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
      if [ "$nodes" -ge $((workers + 1)) ] && curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null; then
        echo "Ray cluster up: head + $workers worker node(s) x $cpus CPU"
        echo "  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
        exit 0
      fi
      sleep 1
    done
    echo "error: the cluster did not come up (see /tmp/ray/session_latest/logs)" >&2
    exit 1
    ;;
  status)
    ray status --address="127.0.0.1:$RAY_PORT"
    ;;
  down)
    ray stop --force >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
      if ! pgrep -f "ray/core/src/ray/raylet/raylet|gcs_server" >/dev/null; then
        rm -rf "${TMPDIR:-/tmp}/ray-node-$RAY_PORT-"*
        echo "Ray cluster stopped"
        exit 0
      fi
      sleep 1
    done
    echo "error: Ray processes are still running" >&2
    exit 1
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

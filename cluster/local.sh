#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine, loopback only: a head and N worker nodes, each with its
# own CPUs and a custom resource naming it (node_head, node_w1, node_w2, ...), the dashboard and job API
# on 127.0.0.1:8265 with token authentication on.
#
#   cluster/local.sh start [N_WORKERS=2] [CPUS_PER_NODE=1]   (the head gets PTM_RAY_HEAD_CPUS, default 0:
#                                                             it runs drivers and the dashboard, not training)
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/finetune.py ...
#   cluster/local.sh stop        # ends only the processes this script started (by pid)
#
# Environment: PTM_RAY_CLUSTER_DIR (state + Ray temp dir, default /tmp/ptm_ray_cluster), PTM_RAY_GCS_PORT
# (default 6390), PTM_RAY_DASHBOARD_PORT (default 8265), PTM_RAY_PORT_BASE (default 24400: node i, the head
# being 0, takes base+i, base+100+i and base+200+i for its agents, so no node takes Ray's default 52365 that
# another Ray on this machine may hold; below Linux's ephemeral range, 32768-60999, where any outgoing
# connection may hold a port, and above Ray's worker ports, 10002-19999), RAY (the ray executable, default .venv/bin/ray).
set -euo pipefail

DIR=${PTM_RAY_CLUSTER_DIR:-/tmp/ptm_ray_cluster}
GCS_PORT=${PTM_RAY_GCS_PORT:-6390}
DASH_PORT=${PTM_RAY_DASHBOARD_PORT:-8265}
BASE=${PTM_RAY_PORT_BASE:-24400}
HERE=$(cd "$(dirname "$0")/.." && pwd)
RAY=${RAY:-$HERE/.venv/bin/ray}
export RAY_AUTH_MODE=token RAY_TRAIN_ENABLE_STATE_TRACKING=1
# Every process of the cluster inherits this: Ray Train's placement-group cleaner looks its cluster up
# through the State API, which without it refuses to choose when another Ray runs on the same machine.
export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
# Job entrypoints say `python ...`: the nodes must find the interpreter that has ray and torch installed.
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"; export PATH

pids_of_cluster() {
  # Every process whose command line names this cluster's own temp dir or GCS address: ours alone.
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    case "$cmd" in
      *"$DIR/"*|*"127.0.0.1:$GCS_PORT"*) echo "${p#/proc/}" ;;
    esac
  done
}

start() {
  local workers=${1:-2} cpus=${2:-1}
  if [ -f "$DIR/started" ]; then echo "a cluster is already running from $DIR (cluster/local.sh stop first)" >&2; exit 1; fi
  mkdir -p "$DIR/ray"
  if [ ${#DIR} -gt 40 ]; then echo "PTM_RAY_CLUSTER_DIR=$DIR is too long: Ray's socket paths under it must fit 107 bytes" >&2; exit 2; fi
  "$RAY" get-auth-token --generate >/dev/null 2>&1 || true
  local t0=$SECONDS
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --temp-dir="$DIR/ray" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --num-cpus="${PTM_RAY_HEAD_CPUS:-0}" --num-gpus=0 \
    --resources='{"node_head": 1}' --dashboard-agent-listen-port="$BASE" --metrics-export-port=$((BASE + 100)) \
    --runtime-env-agent-port=$((BASE + 200)) --disable-usage-stats >"$DIR/head.log" 2>&1
  for i in $(seq 1 "$workers"); do
    # each node on one machine needs its own agent and metrics ports
    # and its own temp dir: nodes sharing one would unpack and garbage-collect each other's job packages
    "$RAY" start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$cpus" --num-gpus=0 \
      --temp-dir="$DIR/w$i" \
      --resources="{\"node_w$i\": 1}" --dashboard-agent-listen-port=$((BASE + i)) \
      --metrics-export-port=$((BASE + 100 + i)) --runtime-env-agent-port=$((BASE + 200 + i)) \
      --disable-usage-stats >"$DIR/worker$i.log" 2>&1
  done
  # ready when the job API answers and all nodes have registered (a submit before that is refused)
  for _ in $(seq 1 60); do
    if "$RAY" job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1 && \
       [ "$("$RAY" list nodes --address "127.0.0.1:$GCS_PORT" --filter "state=ALIVE" 2>/dev/null | grep -c ALIVE)" -ge $((workers + 1)) ]; then
      break
    fi
    sleep 1
  done
  touch "$DIR/started"
  echo "local Ray cluster: head + $workers workers, $cpus CPU each, started in $((SECONDS - t0)) s"
  echo "  address   127.0.0.1:$GCS_PORT"
  echo "  dashboard http://127.0.0.1:$DASH_PORT (token auth: export RAY_AUTH_MODE=token; ray get-auth-token)"
}

stop() {
  local pids
  pids=$(pids_of_cluster | tr '\n' ' ')
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    sleep 3
    kill -9 $(pids_of_cluster | tr '\n' ' ') 2>/dev/null || true
  fi
  rm -f "$DIR/started"
  echo "stopped the local cluster in $DIR (pids: ${pids:-none})"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: cluster/local.sh start [N_WORKERS] [CPUS_PER_NODE] | stop" >&2; exit 2 ;;
esac

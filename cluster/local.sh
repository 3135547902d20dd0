#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, every address on 127.0.0.1, for testing
# `ray job submit` and multi-node training / Ray Data without a real cluster.
#
#   cluster/local.sh up [N]    head + N worker nodes (default 1); prints RAY_ADDRESS for `ray job submit`
#   cluster/local.sh status    `ray status` of that cluster
#   cluster/local.sh down      stop exactly the processes of that cluster (never `ray stop`, which
#                              would also stop every other Ray on the machine)
#   cluster/local.sh env       print the env file's path (source it to talk to the cluster)
#   cluster/local.sh kill-node I   SIGKILL every process of worker node I at once (raylet, agents,
#                              workers): the node is lost as a machine that loses power is
#   cluster/local.sh add-node  start one more worker node (as an autoscaler replaces a lost one);
#                              prints its number
#
# State lives in CWPO_LOCAL_CLUSTER_DIR (default: ${TMPDIR:-/tmp}/cwpo-local-cluster-$USER):
#   env         RAY_ADDRESS (dashboard, for `ray job submit`), CWPO_RAY_GCS_ADDRESS (for ray.init /
#               `ray status`), RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH, ... -- `set -a; . env; set +a`
#   auth_token  the cluster's own token (Ray 2.60 token authentication), not ~/.ray/auth_token
#   ray/        the head node's Ray temp dir (sessions, logs), so it never meets a test's ray.init;
#   ray-wN/     worker node N's own (nodes on one machine must not share runtime_resources/)
#   pids        the cluster's process ids at `up` (for reference: `down` finds them afresh as the
#               processes that name ray/ on their command line, and their descendants)
#
# Knobs (environment): CWPO_NODE_CPUS (logical CPUs per node, default 1),
# CWPO_OBJECT_STORE_BYTES (per node, default 200 MB), RAY (the ray executable, default
# .venv/bin/ray next to this repo, else the one on PATH). Variables already exported when you run
# `up` (e.g. MLFLOW_TRACKING_URI, HF_HUB_OFFLINE) are inherited by every job's driver and worker.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CWPO_LOCAL_CLUSTER_DIR:-${TMPDIR:-/tmp}/cwpo-local-cluster-${USER:-$(id -un)}}"
ENV_FILE="$DIR/env"
if [ -z "${RAY:-}" ]; then
  if [ -x "$REPO/.venv/bin/ray" ]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[ -n "$RAY" ] && [ -x "$RAY" ] || { echo "local.sh: no ray executable (set RAY=...)" >&2; exit 2; }
BIN="$(dirname "$RAY")"
PY="$BIN/python"
[ -x "$PY" ] || PY="$(command -v python3)"
# The venv first on PATH: the raylets' workers and every job's `python jobs/...` use it.
export PATH="$BIN:$PATH"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # else Ray binds the external interface
export RAY_USAGE_STATS_ENABLED=0

die() { echo "local.sh: $*" >&2; exit 1; }

# N distinct free TCP ports on 127.0.0.1, from below the kernel's ephemeral range (cwpo_ray/ports.py says why).
free_ports() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m cwpo_ray.ports "$1"
}

# Every process whose command line names our temp dir (gcs, raylets, dashboard, agents, workers)
# or that is a descendant of one: the cluster, and nothing else.
cluster_pids() {  # cluster_pids [MARK]: MARK defaults to the cluster's temp dirs ($DIR/ray, $DIR/ray-wN)
  "$PY" "$REPO/cluster/processes.py" "${1:-$DIR/ray}"
}

load_env() {
  [ -f "$ENV_FILE" ] || die "no local cluster (no $ENV_FILE); run: cluster/local.sh up"
  set -a; . "$ENV_FILE"; set +a
}

start_node() {  # start_node LOG ARGS...: one `ray start`, its output kept for errors
  local log="$1"; shift
  if ! "$RAY" start "$@" >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
}

# A worker node on loopback. Plain `ray start --address=127.0.0.1:P` cannot do it on Linux:
# with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it refuses to join ("multi-node clusters are not
# supported"), and with =1 it rewrites 127.0.0.1 (head address and node IP) to the machine's
# external IP, where the head does not listen and which we must not bind. So run Ray's own CLI
# with the join check off and "localhost" resolving to 127.0.0.1; the node's processes keep
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
start_worker() {
  local log="$1"; shift
  if ! "$PY" - "$@" >"$log" 2>&1 <<'PYEOF'
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts import scripts

ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"  # what localhost resolves to
sys.argv = ["ray", "start", *sys.argv[1:]]
sys.exit(scripts.main())
PYEOF
  then
    cat "$log" >&2
    return 1
  fi
}

# Every node's own flags: loopback, its logical CPUs and object store (CWPO_NODE_CPUS, CWPO_OBJECT_STORE_BYTES).
node_flags() {
  echo "--node-ip-address=127.0.0.1 --num-cpus=${CWPO_NODE_CPUS:-1} --num-gpus=0" \
       "--object-store-memory=${CWPO_OBJECT_STORE_BYTES:-200000000} --disable-usage-stats"
}

# agent_ports A G R M: a node's agent ports. The defaults (52365, ...) would collide between nodes on one machine.
agent_ports() {
  echo "--dashboard-agent-listen-port=$1 --dashboard-agent-grpc-port=$2 --runtime-env-agent-port=$3 --metrics-export-port=$4"
}

# start_worker_node I GCS_ADDRESS PORT_FLAGS...: worker node I joins the cluster; false if it did not start
# (a `ray start` that timed out waiting for registration counts as started: the caller waits for the node).
# Each node its own temp dir, as on separate machines: nodes sharing one would share runtime_resources/,
# and a node's agent deleting its unused copy of a job's working_dir would pull it from under a driver
# still running in it on the other node. A custom resource only worker nodes have, as a cloud cluster's
# GPU node type has its GPUs: a task that asks for it (e.g. evaluate.node_resource=cwpo_worker_node)
# runs on a worker, not the head.
start_worker_node() {
  local i="$1" gcs="$2"; shift 2
  # shellcheck disable=SC2046
  start_worker "$DIR/worker-$i.log" --address="$gcs" --temp-dir="$DIR/ray-w$i" $(node_flags) \
    --resources='{"cwpo_worker_node": 1}' "$@" 2>/dev/null \
    || grep -q "timed out during startup" "$DIR/worker-$i.log"
}

cmd_up() {
  local workers="${1:-1}" cpus="${CWPO_NODE_CPUS:-1}"
  [[ "$workers" =~ ^[0-9]+$ ]] || die "up: N must be a number of worker nodes, got '$workers'"
  if [ -f "$ENV_FILE" ] && [ -n "$(cluster_pids)" ]; then
    die "a local cluster is already running (state in $DIR); cluster/local.sh down first"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR/ray"
  chmod 700 "$DIR"
  "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/auth_token"
  chmod 600 "$DIR/auth_token"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
  unset RAY_AUTH_TOKEN RAY_ADDRESS

  # Every port of every node from one call: ports probed in separate calls are free when probed and
  # may come back twice (the head's dashboard port was once handed to a node's agent too).
  local ports; read -r -a ports <<<"$(free_ports $((3 + 4 * (workers + 1))))"
  local gcs=${ports[0]} dash=${ports[1]} client=${ports[2]}
  node_ports() { agent_ports "${ports[@]:$((3 + 4 * $1)):4}"; }  # node N's four ports of the ones above

  # shellcheck disable=SC2046
  start_node "$DIR/head.log" --head --port="$gcs" --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port="$dash" --ray-client-server-port="$client" --temp-dir="$DIR/ray" $(node_flags) $(node_ports 0) \
    2>/dev/null || grep -q "timed out during startup" "$DIR/head.log" \
    || { cat "$DIR/head.log" >&2; cmd_down >/dev/null 2>&1 || true; die "the head node did not start (log above)"; }
  # `ray start` gives a raylet 30 s to register with the GCS and then reports failure, but leaves
  # the node running; on a loaded machine that takes longer, so a timeout is not fatal here:
  # the wait below decides.
  local i
  for ((i = 1; i <= workers; i++)); do
    # shellcheck disable=SC2046
    start_worker_node "$i" "127.0.0.1:$gcs" $(node_ports "$i") \
      || { cat "$DIR/worker-$i.log" >&2; cmd_down >/dev/null 2>&1 || true; die "worker node $i did not start (log above)"; }
  done
  cat > "$ENV_FILE" <<EOF
# cwpo local Ray cluster: $((workers + 1)) nodes on 127.0.0.1 (cluster/local.sh). Source with: set -a; . $ENV_FILE; set +a
RAY_ADDRESS=http://127.0.0.1:$dash
CWPO_RAY_GCS_ADDRESS=127.0.0.1:$gcs
CWPO_RAY_DASHBOARD=http://127.0.0.1:$dash
CWPO_RAY_NODES=$((workers + 1))
CWPO_LOCAL_CLUSTER_DIR=$DIR
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$DIR/auth_token
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
  # Wait until every node has registered (a worker's raylet may register after `ray start` returned).
  local alive
  alive="$(CWPO_RAY_GCS_ADDRESS="127.0.0.1:$gcs" alive_nodes "$((workers + 1))" "${CWPO_NODE_WAIT_S:-180}" || true)"
  # ...and until `ray status` shows them: it prints what Ray's autoscaler monitor last wrote, which
  # lists a node some seconds after the node registered (the monitor's update period).
  local shown=0 t0=$SECONDS
  while [ "$alive" = "$((workers + 1))" ] && [ $((SECONDS - t0)) -lt 60 ]; do
    shown="$("$RAY" status --address="127.0.0.1:$gcs" 2>/dev/null | grep -oE '\bnode_[0-9a-f]+' | sort -u | wc -l)"
    [ "$shown" -ge "$alive" ] && break
    sleep 1
  done
  [ "$alive" != "$((workers + 1))" ] || [ "$shown" -ge "$alive" ] || alive="$shown (in \`ray status\`)"
  if [ "$alive" != "$((workers + 1))" ]; then
    for ((i = 1; i <= workers; i++)); do tail -n 5 "$DIR/worker-$i.log" >&2 || true; done
    cmd_down >/dev/null 2>&1 || true
    die "only ${alive:-0} of $((workers + 1)) nodes registered (logs above)"
  fi
  cluster_pids > "$DIR/pids"
  echo "local Ray cluster up: $((workers + 1)) nodes x $cpus CPU on 127.0.0.1 (state in $DIR)"
  echo "  RAY_ADDRESS=http://127.0.0.1:$dash      # dashboard, for \`ray job submit\`"
  echo "  GCS address 127.0.0.1:$gcs             # for ray.init / \`ray status\`"
  echo "  token auth: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
  echo "submit a job:"
  echo "  set -a; . $ENV_FILE; set +a"
  echo "  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/run.py pipeline --config jobs/configs/benchmark_cpu.yaml"
}

cmd_status() {
  load_env
  local pids; pids="$(cluster_pids)"
  [ -n "$pids" ] || die "the cluster in $DIR is not running (stale env file; cluster/local.sh down cleans it)"
  echo "RAY_ADDRESS=$RAY_ADDRESS  (GCS $CWPO_RAY_GCS_ADDRESS, $(wc -w <<<"$pids") processes)"
  "$RAY" status --address="$CWPO_RAY_GCS_ADDRESS"
}

# The cluster's processes of one kind: raylet, gcs_server, or every other one.
pids_of() {
  local p c
  for p in $(cluster_pids); do
    c="$(cat "/proc/$p/comm" 2>/dev/null)" || continue
    case "$1:$c" in raylet:raylet | gcs:gcs_server) echo "$p" ;; rest:raylet | rest:gcs_server | raylet:* | gcs:*) ;; rest:*) echo "$p" ;; esac
  done
}

# Worker node I's processes: those naming its own temp dir (ray-wI/, the slash so that node 1 is not
# node 10) and their descendants.
cmd_kill_node() {
  local i="${1:-}"
  [[ "$i" =~ ^[1-9][0-9]*$ ]] || die "kill-node: I must be a worker node's number (1, 2, ...), got '$i'"
  load_env
  local pids; pids="$(cluster_pids "$DIR/ray-w$i/")"
  [ -n "$pids" ] || die "kill-node: worker node $i has no processes (not started, or already lost)"
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  echo "worker node $i lost: SIGKILLed $(wc -w <<<"$pids") processes:" $pids
}

# One more worker node, numbered after the highest one ever started (a lost node's folder stays).
cmd_add_node() {
  load_env
  local i=1 ports
  while [ -e "$DIR/ray-w$i" ] || [ -e "$DIR/worker-$i.log" ]; do i=$((i + 1)); done
  read -r -a ports <<<"$(free_ports 4)"
  # shellcheck disable=SC2046
  start_worker_node "$i" "$CWPO_RAY_GCS_ADDRESS" $(agent_ports "${ports[@]}") \
    || die "worker node $i did not start: $(tail -n 5 "$DIR/worker-$i.log")"
  # A lost node may still count as alive until the GCS misses its heartbeats: wait for this one by its temp dir.
  [ "$(alive_nodes 1 "${CWPO_NODE_WAIT_S:-180}" "$DIR/ray-w$i/")" = 1 ] \
    || die "worker node $i did not register: $(tail -n 5 "$DIR/worker-$i.log")"
  echo "worker node $i up"
}

# alive_nodes WANT WAIT_S [MARK]: the number of live nodes (with MARK: those whose raylet socket lies
# under the temp dir MARK), once it reaches WANT or after WAIT_S seconds.
alive_nodes() {
  "$PY" - "$CWPO_RAY_GCS_ADDRESS" "$1" "$2" "${3:-}" 2>/dev/null <<'PYEOF' | tail -n 1
import sys, time
import ray
want, deadline, mark = int(sys.argv[2]), time.monotonic() + float(sys.argv[3]), sys.argv[4]
while True:  # every node is on 127.0.0.1: a driver may pick a raylet just lost, not yet marked dead
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
while True:
    alive = sum(1 for n in ray.nodes() if n["Alive"] and mark in n.get("RayletSocketName", ""))
    if alive >= want or time.monotonic() > deadline:
        break
    time.sleep(1)
print(alive)
PYEOF
}

cmd_down() {
  [ -d "$DIR" ] || { echo "no local cluster in $DIR"; return 0; }
  # In `ray stop`'s order: raylets first, the GCS last. Stopped all at once, the GCS waits for
  # agents that are already gone and outlives any grace period (15 s here every time, then killed).
  local kind pids deadline
  for kind in raylet rest gcs; do
    pids="$(pids_of "$kind")"
    [ -n "$pids" ] || continue
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [ -n "$(pids_of "$kind")" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  done
  pids="$(cluster_pids)"
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  rm -rf "$DIR"
  echo "local Ray cluster stopped"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) load_env >/dev/null; echo "$ENV_FILE" ;;
  kill-node) shift; cmd_kill_node "$@" ;;
  add-node) cmd_add_node ;;
  *) echo "usage: cluster/local.sh up [N] | down | status | env | kill-node I | add-node" >&2; exit 2 ;;
esac

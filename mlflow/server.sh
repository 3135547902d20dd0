#!/usr/bin/env bash
# An MLflow tracking server for cwpo runs: SQLite backend + an artifact folder, on 127.0.0.1.
#
#   mlflow/server.sh                         foreground, port 5000, data in ./mlflow/store/server (git-ignored)
#   MLFLOW_PORT=5001 mlflow/server.sh        another port
#   MLFLOW_DATA=/mnt/shared/mlflow mlflow/server.sh
#   MLFLOW_HOST=0.0.0.0 mlflow/server.sh     reachable from other machines (put auth/TLS in front)
#
# then, in the shell that runs cwpo (or in the jobs' runtime_env env_vars / the nodes' env):
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Artifacts are served through the server (--serve-artifacts via --artifacts-destination), so
# clients (Ray workers on other nodes too) need only the HTTP address, not the folder.
# Any extra arguments go to `mlflow server` (e.g. --workers 2). Ctrl-C stops it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${MLFLOW_DATA:-$REPO/mlflow/store/server}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
if [ -n "${MLFLOW:-}" ]; then
  MLFLOW_CMD=("$MLFLOW")
elif [ -x "$REPO/.venv/bin/python" ]; then
  MLFLOW_CMD=("$REPO/.venv/bin/python" -m mlflow)
else
  MLFLOW_CMD=(python3 -m mlflow)
fi

mkdir -p "$DATA/artifacts"
DATA="$(cd "$DATA" && pwd)"
echo "mlflow server: http://$HOST:$PORT  (backend sqlite:///$DATA/mlflow.db, artifacts $DATA/artifacts)" >&2
echo "  export MLFLOW_TRACKING_URI=http://$HOST:$PORT" >&2
exec "${MLFLOW_CMD[@]}" server \
  --host "$HOST" --port "$PORT" \
  --backend-store-uri "sqlite:///$DATA/mlflow.db" \
  --artifacts-destination "$DATA/artifacts" \
  "$@"

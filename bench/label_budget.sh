#!/usr/bin/env bash
# The label-budget runs behind bench/label_budget.py, one seed at a time (each ~2 hours on 2 CPU cores):
# the `full` preset, DPO, at labeled fractions 0.3 (arms human, ws, cw: human is the all-labels baseline
# every fraction is compared with), 0.1 and 0.2 (ws, cw). After each run its per-prompt wins are exported
# into WINS, one small JSON file per (fraction, seed), so that the figure outlives the run's MLflow store.
#
#   bench/label_budget.sh 0 1 2        # then: .venv/bin/python bench/label_budget.py table --seeds 0,1,2 ...
#
# RUNS (default runs/label-budget) holds each fraction's pipeline OUT and, unless MLFLOW_TRACKING_URI is
# set, the MLflow store; a run interrupted resumes from its stage markers when the same seed is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bench/label_budget.sh SEED [SEED ...]" >&2; exit 2; }
runs=$(realpath -m "${RUNS:-runs/label-budget}")
wins=${WINS:-bench/label_budget/wins}
mkdir -p "$runs"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$runs/mlflow.db}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
for seed in "$@"; do
  for fraction in 0.3 0.1 0.2; do
    [ -f "$wins/fraction$fraction-seed$seed.json" ] && { echo "label_budget.sh: $fraction seed $seed exported already"; continue; }
    arms='[ws,cw]'; [ "$fraction" = 0.3 ] && arms='[human,ws,cw]'
    .venv/bin/cwpo pipeline --config cwpo_ray/configs/full.yaml --out "$runs/fraction-$fraction" \
      --experiment cwpo-label-budget --run-name "label-budget-$fraction" "seeds=[$seed]" "arms=$arms" \
      'losses=[dpo]' "data.labeled_fraction=$fraction"
    .venv/bin/python bench/label_budget.py export --run "$fraction=cwpo-label-budget/label-budget-$fraction" \
      --seeds "$seed" --to "$wins"
  done
done

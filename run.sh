#!/usr/bin/env bash
# Set up (or reuse) .venv and run the main job: the CW-PO pipeline on the built-in benchmark
# (quick preset, under 10 minutes on 2 CPU cores), then print the arms x losses comparison.
# Extra arguments are passed to `cwpo pipeline` (e.g. --config cwpo_ray/configs/full.yaml).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
if [ $# -eq 0 ]; then set -- --config cwpo_ray/configs/quick.yaml; fi
exec .venv/bin/cwpo pipeline "$@"

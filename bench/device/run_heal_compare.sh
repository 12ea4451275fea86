#!/usr/bin/env bash
# Second device call: issue 5's open point on CUDA, allocated saten-aw vs uniform Wanda (per-row masks) at one
# byte ratio with the same, longer healing. Rows go to $OUT/methods_gpu_heal.jsonl. As run on 2026-11-29:
#   STEPS=384 HT=16384 RATIO=0.5 LR=3e-4 bash bench/device/run_heal_compare.sh
#   STEPS=384 HT=16384 RATIO=0.8 LR=3e-5 bash bench/device/run_heal_compare.sh
# (HT is capped by the calibration split: 30565 tokens.)
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/device/site.sh
"$PYBIN" -m saten_core warm-cache
O="${OUT:-/tmp}/methods_gpu_heal.jsonl"; mkdir -p "$(dirname "$O")"
H="--tokens ${TOK:-4096} --heal-seq-len 128 --heal-tokens ${HT:-16384} --heal-eval-tokens 512 --lowrank-share 0.05 \
 --heal-steps ${STEPS:-384} --heal-eval-every ${EVERY:-64} --heal-lr ${LR:-3e-4} --ratios ${RATIO:-0.5} --out $O"
for args in "--allocate --methods saten-aw:unstructured" "--methods wanda:unstructured"; do
  s=$(date +%s); "$PYBIN" bench/bench_methods.py $args $H; echo "[$args] wall $(( $(date +%s) - s )) s"
done

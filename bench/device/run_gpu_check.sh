#!/usr/bin/env bash
# Second device call: bench/gpu_check.sh on the lent machine (see prepare_carry.sh). Arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/device/site.sh
start=$(date +%s)
bash bench/gpu_check.sh "$@"
echo "gpu_check.sh wall: $(( $(date +%s) - start )) s"

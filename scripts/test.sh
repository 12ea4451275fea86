#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite, slow tests on real models included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"

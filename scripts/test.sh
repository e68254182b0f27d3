#!/usr/bin/env bash
# Set up from scratch (see scripts/setup.sh) and run the whole test suite plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check src tests benchmarks scripts
python -m pytest -q "$@"

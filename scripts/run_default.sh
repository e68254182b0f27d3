#!/usr/bin/env bash
# Set up from scratch and run the main job: the default comparison on the embedded corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mixsel compare --config configs/compare.yaml "$@"

#!/usr/bin/env bash
# Create .venv and install mixsel with every extra (TRL and W&B included). CPU PyTorch is pinned; for a GPU machine set
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch (also via peft/accelerate) pulls a multi-GB CUDA build.
python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
python -m pip install --quiet -e ".[all]" "${TORCH_PIN:-torch==2.13.0}"
python -c "import torch, transformers, peft, trl, mixsel; print('mixsel', mixsel.__version__, 'torch', torch.__version__, 'trl', trl.__version__)"
# opt-in: the pretrained SmolLM2-135M-Instruct of the fine-tuning experiments (98 MB download)
if [ "${MIXSEL_SMOLLM2:-0}" = "1" ]; then
  bash scripts/get_smollm2.sh
fi

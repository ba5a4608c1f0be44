#!/usr/bin/env bash
# Install PyTorch into the given Python's environment: the CUDA build on a machine with an NVIDIA
# GPU, the (much smaller) CPU build elsewhere. Run before `pip install -e .`, whose torch range
# this satisfies, so pip never swaps in another multi-GB build.
#   scripts/install_torch.sh .venv/bin/python
set -euo pipefail
py=${1:-python3}
if "$py" -c "import torch" 2>/dev/null; then
  echo "torch $("$py" -W 'ignore:Failed to initialize NumPy' -c 'import torch; print(torch.__version__)') already installed"; exit 0
fi
pip=("$py" -m pip install -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # PyPI's Linux wheels are the CUDA builds.
  "${pip[@]}" "torch>=2.4,<2.15"
elif [[ "$(uname -s)" == "Darwin" ]]; then
  "${pip[@]}" "torch>=2.4,<2.15"            # macOS wheels are CPU/MPS builds
else
  # A CPU build from a local wheel folder if the machine has one (pip's find-links; its
  # dependencies still come from the index), else PyTorch's CPU wheel index, else PyPI.
  probe=$(mktemp -d)
  if "$py" -m pip download -q --no-deps --no-index -d "$probe" torch==2.13.0 >/dev/null 2>&1; then
    "${pip[@]}" torch==2.13.0
  else
    "${pip[@]}" --timeout 15 --retries 1 torch==2.13.0 \
        --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
      || "${pip[@]}" torch==2.13.0
  fi
  rm -rf "$probe"
fi
# numpy comes with the package install after this; torch would warn here that it cannot find it yet.
"$py" -W "ignore:Failed to initialize NumPy" -c "import torch; print('installed torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

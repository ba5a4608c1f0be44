#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what bench/device_check.py needs on a GPU machine that has no
# network: the wheels its image lacks, the data, and Qwen2.5's tokenizer. Run here, from anywhere:
#
#   bash bench/device_prepare.sh            # PYTHON=... picks the interpreter (default .venv/bin/python)
#
# The GPU image (Python 3.12, torch 2.11, transformers 5.17, peft, accelerate, pandas, pyarrow, ...)
# lacks trl, datasets and the two packages datasets needs that nothing else there brings (dill,
# multiprocess). Its transformers is too old for the stages: they pass `activation_checkpointing` to
# TRL's configs, a TrainingArguments field that transformers 5.17 does not have. So the stack the
# tests pass on here is carried too: transformers 5.24.0 (which needs huggingface-hub >= 1.31; 1.31.0
# needs nothing new at import: click and hf-xet only for its CLI and xet downloads), peft and
# accelerate at this venv's versions. All pure Python (multiprocess ships one wheel per Python
# version, hence the cp312 target); torch, tokenizers, safetensors, numpy, pandas, pyarrow stay the
# image's. wandb and gguf stay behind: the stages import wandb only when W&B is on (the check runs
# with no_wandb), gguf only for .gguf models. Installing needs no pip: a pure-Python wheel is a zip
# to extract (the command in bench/README.md, section GPU), and the extracted folder goes first on
# PYTHONPATH, in front of the image's packages. datasets 5.0.1 rather than this venv's 5.2.0: 5.2
# declares pyarrow >= 24, 5.0.1 >= 21 (as trl does), and pyarrow stays the image's, version unknown.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=.gpu
DATA=${DATA_DIR:-../shared/data}
WHEELS=(trl==1.16.0 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
        huggingface_hub==1.31.0 peft==0.21.2 accelerate==1.15.0)

rm -rf "$OUT/whl" "$OUT/data" "$OUT/qwen-tokenizer"
mkdir -p "$OUT/whl"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$OUT/whl" "${WHEELS[@]}"
[ -f "$DATA/sarcasm_v2/GEN-sarc-notsarc.csv" ] || { echo "no data at $DATA (set DATA_DIR)" >&2; exit 2; }
cp -r "$DATA" "$OUT/data"
chmod -R u+w "$OUT/data"  # the shared copy is read-only; a rerun must be able to replace this one
PYTHONPATH=src "$PY" bench/qwen_tokenizer.py --copy_to "$OUT/qwen-tokenizer" >/dev/null

# The install the GPU machine will do, done here into a scratch folder: every wheel extracts and
# carries its metadata (importlib.metadata finds datasets' dependencies' versions).
check=$(mktemp -d)
"$PY" -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob('$OUT/whl/*.whl')]" "$check"
for pkg in trl datasets dill multiprocess transformers huggingface_hub peft accelerate; do
    ls -d "$check/$pkg"-*.dist-info >/dev/null || { echo "$pkg: no metadata after extraction" >&2; exit 1; }
done
rm -rf "$check"
size=$(du -sm "$OUT" | cut -f1)
echo "$OUT: ${size} MiB ($(ls "$OUT/whl" | tr '\n' ' '))"
[ "$size" -lt 60 ] || { echo "$OUT is over 60 MiB: too big to carry" >&2; exit 1; }

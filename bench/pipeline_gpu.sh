#!/usr/bin/env bash
# run_all.sh on a GPU box whose Python stack lacks spaCy, PyAV and gguf (so neither prep.py nor
# the embedded Gemma runs there): the demo set is prepared elsewhere with prep.py, and L is a
# Gemma-shaped model with random weights (bench/random_lm.py). The training stages do the same work
# at the same sizes, so the stage times are real; the perplexities are not (L knows no English).
#
#   bash bench/pipeline_gpu.sh PREPARED LM_LIKE RESULTS
#
# PREPARED: prep.py's output (frames.npy may be frames.npy.xz); LM_LIKE: a folder with the
# embedded Gemma's config.json and tokenizer files; RESULTS: where run_all's outputs go.
# NGPU (default: all visible GPUs) picks the torchrun width.
set -euo pipefail
cd "$(dirname "$0")/.."
prepared=$1 like=$2 results=$3
export PYTHON=${PYTHON:-python3} NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

data=$results/data
mkdir -p "$data"
cp "$prepared"/*.json "$prepared"/*.csv "$prepared"/*.jsonl "$data"/
if [ -e "$prepared/frames.npy.xz" ]; then
  "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as o:
    shutil.copyfileobj(f, o)' "$prepared/frames.npy.xz" "$data/frames.npy"
else
  cp "$prepared/frames.npy" "$data/"
fi
[ -e "$results/lm/model.safetensors" ] || "$PYTHON" bench/random_lm.py --like "$like" --out "$results/lm"
DATA=$data OUT=$results/run LM=$results/lm bash run_all.sh

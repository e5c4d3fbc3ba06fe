#!/usr/bin/env bash
# The one prepared GPU check, for the `device` tool (15 minutes of device time in all):
#   bash bench/gpu_wheels.sh            # here, once: wheels the GPU image lacks
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 560
# Results land in $OUT (engine-*.json, *.log); copy the figures into BENCHMARKS.md with
# the device, the commit and these command lines.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
# 1. Correctness on CUDA: device n-gram blocking equals HF's, and a real summarizer run.
timeout 90 python3 - <<'PY' 2>&1 | tee "$OUT/cuda-checks.log"
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
from streamproc.decoding import DeviceNoRepeatNGram
ids = torch.randint(0, 12, (64, 40), device="cuda"); scores = torch.randn(64, 12, device="cuda")
ref = NoRepeatNGramLogitsProcessor(3)(ids.cpu(), scores.cpu().clone())
assert torch.equal(ref, DeviceNoRepeatNGram(3)(ids, scores.clone()).cpu()), "n-gram mismatch"
print("device n-gram blocking matches HF on CUDA")
PY
# 2. Engine throughput, BART-large-CNN shape, fp16: greedy, then the checkpoint's beam settings.
timeout 300 python3 bench/engine.py --shape bart-large-cnn --device cuda --gen greedy \
  --items 1536 --no-bare --json "$OUT/engine-greedy.json" 2>&1 | tee "$OUT/engine-greedy.log"
timeout 200 python3 bench/engine.py --shape bart-large-cnn --device cuda --gen checkpoint \
  --items 512 --no-bare --no-mixed --json "$OUT/engine-checkpoint.json" 2>&1 \
  | tee "$OUT/engine-checkpoint.log"

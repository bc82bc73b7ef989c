#!/bin/bash
# The sampler on an accelerator before and after a change, in turn in one device call:
# `sampler_device.py` (Qwen2.5-VL-3B shapes, bf16, G = 8, 256 new tokens) at 64 and 256
# rows for the code in .base/ (the "before") and the working tree (the "after").
#
#   Here:   rm -rf .base && mkdir .base && git archive BASE_COMMIT dprl benchmarks | tar -x -C .base
#           (.base/ is ignored through .git/info/exclude; the device call carries it)
#   There:  bash benchmarks/sampler_device_compare.sh   (JSON to $OUT/{before,after}_{8,32}.json)
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/sampler_compare}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv
for p in 8 32; do
  echo "=== before, $p prompts x 8"
  (cd .base && PYTHONPATH=. timeout 120 python3 benchmarks/sampler_device.py --prompts $p --samples 8 \
      --new_tokens 256 --json "$OUT/before_$p.json" 2>&1 | tail -4)
  echo "=== after, $p prompts x 8"
  PYTHONPATH=. timeout 120 python3 benchmarks/sampler_device.py --prompts $p --samples 8 --new_tokens 256 \
      --json "$OUT/after_$p.json" 2>&1 | tail -4
done

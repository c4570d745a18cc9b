#!/usr/bin/env bash
# Mixed prefill + decode forwards on the GPU (issue 5: steps that mix both looked dearer
# than their parts).  After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/mixed.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu-extra/site
export SLABSERVE_CACHE_DIR=/tmp/sscache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
M="python -m bench.mixed_step --model embedded:qwen2.5-0.5b --dtype bfloat16 --ctx 16000"
echo "== 2 decodes"; timeout 200 $M --decodes 2 2>&1 | tail -10
echo "== 8 decodes"; timeout 200 $M --decodes 8 2>&1 | tail -10
if command -v nsys > /dev/null; then
  echo "== nsys, 2 decodes"
  timeout 200 nsys profile -o "$OUT/mixed" --force-overwrite true -t cuda,nvtx $M --decodes 2 --reps 3 > "$OUT/nsys.log" 2>&1
  nsys stats -q --report cuda_gpu_kern_sum --format csv "$OUT/mixed.nsys-rep" 2>/dev/null | head -25 | cut -c1-200
  rm -f "$OUT/mixed.nsys-rep" "$OUT"/*.sqlite
else
  echo "no nsys"
fi

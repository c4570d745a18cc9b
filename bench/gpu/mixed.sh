#!/usr/bin/env bash
# Mixed prefill + decode forwards on the GPU (issue 5: steps that mix both looked dearer
# than their parts).  After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/mixed.sh
. bench/gpu/env.sh
M="python -m slabserve.bench.mixed_step --model embedded:qwen2.5-0.5b --dtype bfloat16 --ctx 16000"
for flags in "" "--advance --thread"; do
  echo "== 8 decodes $flags"; timeout 150 $M --decodes 8 $flags 2>&1 | tail -13
done

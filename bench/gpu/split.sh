#!/usr/bin/env bash
# Host graph building vs evaluation of decode and prefill-row forwards on the GPU, and the
# graph's node count (issue 5: what a step's time is made of).  After the set-up runs
# (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/split.sh [MODEL]
. bench/gpu/env.sh
model=${1:-embedded:qwen2.5-0.5b}
timeout 300 python -m slabserve.bench.host_split --model "$model" --dtype bfloat16 --decodes 8 \
  --ctxs 16,4000,16000 --rows 1,2,4,8 --dispatch-every 0,12,6 --profile 2>&1 | grep -v "^ *$" | head -50
timeout 120 python -m slabserve.bench.graph_nodes --model "$model" --dtype bfloat16 --batch 8 \
  --ctx 4000 --chunk 2048 2>&1 | tail -3

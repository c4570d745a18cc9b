#!/usr/bin/env bash
# Where concurrent long prompts spend the engine's steps on the GPU (issue 5's 16k cells).
# After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/burst.sh [PROMPT] [REQUESTS]
. bench/gpu/env.sh
p=${1:-16000}; n=${2:-8}
B="python -m slabserve.bench.burst --model embedded:qwen2.5-0.5b --dtype bfloat16 --prompt $p --max-tokens 32"
echo "== 1 x $p"; timeout 150 $B --requests 1 --rounds 2 --show 12 2>&1 | tail -16
echo "== $n x $p"; timeout 250 $B --requests $n --rounds 2 --show 60 2>&1 | tail -64

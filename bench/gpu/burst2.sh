#!/usr/bin/env bash
# Are the slow mixed steps of bench.burst (8 x 16000) one-time costs?  Three rounds, then
# three with the prefill kv bucket on.  After the set-up runs, carrying .gpu-extra.
. bench/gpu/env.sh
B="python -m slabserve.bench.burst --model embedded:qwen2.5-0.5b --dtype bfloat16 --prompt 16000 --max-tokens 32 --requests 8 --rounds 3"
echo "== default"; timeout 200 $B --show 20 2>&1 | grep -v "^    [0-9] *0 " | tail -24
echo "== kv bucket 2048"; SLABSERVE_PREFILL_KV_BUCKET=2048 timeout 200 $B --show 20 2>&1 | tail -24

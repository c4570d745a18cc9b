#!/usr/bin/env bash
# Prefix caching on the lent GPU (recipe: /work/shared/gpu/README.md; run from the repo root
# after the two-part MLX install): the chat scenario, Llama-3.2-1B shape in bfloat16, 8
# sessions x 4 turns sharing an 8,000-token system prompt, ours with the cache, ours without
# it and mlx_lm.server, each ours with its own device-sized KV pool (no --kv-budget); then
# concurrency-8 throughput with nothing shared, cache on vs off, two interleaved rounds.
# Results under $OUT (chat-gpu/, nocache-grid/).
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 SLABSERVE_CACHE_DIR=/tmp/sscache
OUT="${OUT:-out}"
LT="python -m slabserve.cli loadtest --compare --embedded llama-3.2-1b:bfloat16"
STEP="${1:-all}"
if [[ "$STEP" == all || "$STEP" == chat ]]; then
  timeout 420 $LT --scenario chat --configs auto,mlx_lm --variant nocache=--no-prefix-caching \
    --server-arg=--kv-memory-fraction=0.9 --sessions 8 --turns 4 --system-tokens 8000 \
    --user-tokens 64 --reply-tokens 32 --out "$OUT/chat-gpu" > "$OUT/chat-gpu.log" 2>&1
  tail -25 "$OUT/chat-gpu/chat.md"; grep -h "KV pool" "$OUT"/chat-gpu/server-*.log
fi
if [[ "$STEP" == all || "$STEP" == grid ]]; then
  timeout 300 $LT --configs auto --variant nocache=--no-prefix-caching --contexts 4k \
    --concurrency 8 --max-tokens 64 --rounds 2 --out "$OUT/nocache-grid" \
    > "$OUT/nocache-grid.log" 2>&1
  tail -20 "$OUT/nocache-grid/results.md"
fi

#!/usr/bin/env bash
# Mixed prompt lengths (issue 5, next to measure): the concurrency-8 cells with prompt
# lengths spread over [50%, 100%] of the context, ours as shipped (the prefill attention
# shape bucket, 2048 tokens on CUDA since the sixth session) vs exact shapes (every new
# q / kv length is a new cuDNN graph on CUDA, docs/adr/0006) vs mlx_lm.server, in one
# invocation.  After the set-up runs, carrying .gpu-extra:
#   bash bench/gpu/lengths.sh [MODEL[:DTYPE]] [CONTEXTS]
model=${1:-qwen2.5-0.5b:bfloat16}; ctxs=${2:-4k,16k}
bash bench/gpu/loadgrid.sh "$model" "$ctxs" --concurrency 8 --requests 16 --length-spread 0.5 \
  --configs auto,mlx_lm --variant "exact=--prefill-kv-bucket 0"

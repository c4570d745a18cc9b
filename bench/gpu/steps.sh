#!/usr/bin/env bash
# Issue 5 A/B on the lent GPU machine: the concurrency-8 cells with a second wave of
# arrivals (16 requests), ours as shipped vs larger step budgets (more prefill chunks per
# step, as rows of one forward) vs mlx_lm.server, in one invocation.  After the set-up runs
# (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/steps.sh [MODEL[:DTYPE]] [CONTEXTS]
model=${1:-qwen2.5-0.5b:bfloat16}; ctxs=${2:-4k,16k}
bash bench/gpu/loadgrid.sh "$model" "$ctxs" --concurrency 8 --requests 16 \
  --configs auto,mlx_lm --variant "s8k=--max-step-tokens 8256" \
  --variant "s16k=--max-step-tokens 16448"

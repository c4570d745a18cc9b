#!/usr/bin/env bash
# Decode steps on the lent GPU (recipe: /work/shared/gpu/README.md; run from the repo root
# after the two-part MLX install; llguidance's abi3 wheel contents in ./.extra):
#   phases   per-phase step times, eager vs compiled stages (slabserve bench decode-phases),
#            Llama-3.2-1B and Qwen2.5-0.5B shapes in bfloat16;
#   compare  streamed load, ours (compiled stages) vs ours --enforce-eager vs mlx_lm.server,
#            Llama-3.2-1B shape, concurrency 1 and 8 at 1k and 4k;
#   prefix   prefix cache on vs off with nothing shared, in one process
#            (slabserve bench prefix-overhead), Llama-3.2-1B shape, 4k, concurrency 8;
#   spread   four processes of the same decode-phases cell, two of them pinned to one
#            core (taskset), to see how far processes of one tree differ.
# Results under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site:$PWD/.extra" PYTHONUNBUFFERED=1 SLABSERVE_CACHE_DIR=/tmp/sscache
OUT="${OUT:-out}"
SS="python -m slabserve.cli"
for STEP in "${@:-phases}"; do
  case "$STEP" in
  phases)
    for m in llama-3.2-1b qwen2.5-0.5b; do
      timeout 240 $SS bench decode-phases --embedded "$m:bfloat16" --batches 1,8,32 \
        --contexts 1k,4k,16k --steps 10 --warmup 3 --out "$OUT/phases" > "$OUT/phases-$m.log" 2>&1
      tail -19 "$OUT/phases-$m.log"
    done ;;
  compare)
    timeout 420 $SS loadtest --compare --embedded llama-3.2-1b:bfloat16 --configs auto,mlx_lm \
      --variant eager=--enforce-eager --contexts 1k,4k --concurrency 1,8 --max-tokens 64 \
      --requests 8,16 --out "$OUT/compare" > "$OUT/compare.log" 2>&1
    sed -n '/## Comparison/,/## Goals/p' "$OUT/compare/results.md" ;;
  prefix)
    timeout 300 $SS bench prefix-overhead --embedded llama-3.2-1b:bfloat16 --out "$OUT/prefix" \
      > "$OUT/prefix.log" 2>&1
    tail -15 "$OUT/prefix.log" ;;
  spread)
    for i in 1 2 3 4; do
      pin=""; [[ $((i % 2)) == 0 ]] && pin="taskset -c 3"
      timeout 100 $pin $SS bench decode-phases --embedded llama-3.2-1b:bfloat16 --batches 1,8 \
        --contexts 1k --steps 30 --warmup 5 --out "$OUT/spread-$i" > "$OUT/spread-$i.log" 2>&1
      echo "process $i ${pin:-unpinned}"; grep -E "^\| (1|8) \| 1024" "$OUT/spread-$i.log" | tail -4
    done ;;
  esac
done

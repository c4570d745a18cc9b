#!/usr/bin/env bash
# Issue 5 on the lent GPU machine: the load grid, ours (auto/native/gather) vs mlx_lm.server
# on a realistic shape.  After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/loadgrid.sh MODEL[:DTYPE] [CONTEXTS] [extra loadtest args...]
. bench/gpu/env.sh
model=${1:-qwen2.5-0.5b:bfloat16}; ctxs=${2:-1k,4k,16k}; shift 2 || true
name=${model%%:*}
timeout 560 python -m slabserve.cli loadtest --compare --embedded "$model" --contexts "$ctxs" \
  --concurrency 1,4,8 --max-tokens 64 --requests 4,8,8 --duration 40 \
  --out "$OUT/lt-$name" --no-progress "$@" > "$OUT/lt-$name.log" 2>&1
echo "rc=$?"
sed -n '/## Comparison/,$p' "$OUT/lt-$name/results.md" 2>/dev/null | head -40 || tail -40 "$OUT/lt-$name.log"

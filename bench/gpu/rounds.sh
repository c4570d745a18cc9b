#!/usr/bin/env bash
# Issue 5's "auto within 5% of the better forced path" with process noise averaged out:
# auto, forced native and forced gather, interleaved over ROUNDS passes, each cell compared
# by its median run (slabserve loadtest --rounds).  One invocation per context, so an early
# one is kept if a later one runs out of time.  After the set-up runs, carrying .gpu-extra:
#   ROUNDS=3 CONC=1,4,8 REQS=4,8,8 bash bench/gpu/rounds.sh [MODEL[:DTYPE]] [CONTEXT...]
. bench/gpu/env.sh
model=${1:-qwen2.5-0.5b:bfloat16}; shift || true
name=${model%%:*}
for ctx in "${@:-4k}"; do
  timeout ${ROUND_TIMEOUT:-280} python -m slabserve.cli loadtest --compare --embedded "$model" \
    --contexts "$ctx" --concurrency "${CONC:-1,8}" --requests "${REQS:-4,8}" \
    --configs auto,native,gather \
    --rounds "${ROUNDS:-3}" --out "$OUT/r-$name-$ctx" --no-progress > "$OUT/r-$name-$ctx.log" 2>&1
  echo "rc=$? ($ctx)"
  rm -f "$OUT/r-$name-$ctx"/server-*.log "$OUT/r-$name-$ctx"/*.png
  sed -n '/## Comparison/,/## Goals/p' "$OUT/r-$name-$ctx/results.md" 2>/dev/null || tail -5 "$OUT/r-$name-$ctx.log"
done

#!/usr/bin/env bash
# Issue 5's "auto within 5% of the better forced path" with process noise averaged out:
# auto, forced native and forced gather, interleaved over ROUNDS passes, each cell compared
# by its median run (slabserve loadtest --rounds).  One invocation per context, so an early
# one is kept if a later one runs out of time; a CONTEXT of "1k,4k,16k" runs them in one
# invocation (one server start per configuration and round).  After the set-up runs,
# carrying .gpu-extra:
#   ROUNDS=3 CONC=1,4,8 REQS=4,8,8 bash bench/gpu/rounds.sh [MODEL[:DTYPE]] [CONTEXT...]
. bench/gpu/env.sh
model=${1:-qwen2.5-0.5b:bfloat16}; shift || true
name=${model%%:*}
for ctx in "${@:-4k}"; do
  tag=${ctx//,/-}
  timeout ${ROUND_TIMEOUT:-280} python -m slabserve.cli loadtest --compare --embedded "$model" \
    --contexts "$ctx" --concurrency "${CONC:-1,8}" --requests "${REQS:-4,8}" \
    --configs auto,native,gather \
    --rounds "${ROUNDS:-3}" --out "$OUT/r-$name-$tag" --no-progress > "$OUT/r-$name-$tag.log" 2>&1
  echo "rc=$? ($ctx)"
  rm -f "$OUT/r-$name-$tag"/server-*.log "$OUT/r-$name-$tag"/*.png
  sed -n '/## Comparison/,/## Goals/p' "$OUT/r-$name-$tag/results.md" 2>/dev/null || tail -5 "$OUT/r-$name-$tag.log"
done

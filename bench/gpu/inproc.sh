#!/usr/bin/env bash
# Issue 5's "auto within 5% of the better forced path" inside ONE server process: auto,
# forced native and forced gather served by one `slabserve serve --admin-endpoints`, the
# path switched before each run (slabserve loadtest --compare --one-server), interleaved
# per cell and round (order rotated each round), each cell compared by its median run.
# Separate processes of the same code differed by up to 1.41x (A/A, loadtest-gpu.md).
# Past INPROC_TIMEOUT, `timeout` sends SIGTERM: the report is still written, from the runs
# that finished ("Stopped early" at its top).
# One invocation for all CONTEXTS (one server start).  After the set-up runs, carrying
# .gpu-extra:
#   ROUNDS=3 CONC=1,4,8 REQS=4,8,8 bash bench/gpu/inproc.sh [MODEL[:DTYPE]] [CONTEXTS]
. bench/gpu/env.sh
model=${1:-qwen2.5-0.5b:bfloat16}; ctxs=${2:-1k,4k,16k}
name=${model%%:*}; tag=${ctxs//,/-}
timeout ${INPROC_TIMEOUT:-560} python -m slabserve.cli loadtest --compare --one-server \
  --embedded "$model" --contexts "$ctxs" --concurrency "${CONC:-1,4,8}" \
  --requests "${REQS:-4,8,8}" --configs auto,native,gather --rounds "${ROUNDS:-3}" \
  --out "$OUT/i-$name-$tag" --no-progress > "$OUT/i-$name-$tag.log" 2>&1
echo "rc=$? ($ctxs)"
rm -f "$OUT/i-$name-$tag"/*.png
sed -n '/## Comparison/,/## Goals/p' "$OUT/i-$name-$tag/results.md" 2>/dev/null || tail -5 "$OUT/i-$name-$tag.log"
sed -n '/## Goals/,$p' "$OUT/i-$name-$tag/results.md" 2>/dev/null | grep -E "best forced|WARNING"

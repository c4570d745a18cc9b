#!/usr/bin/env bash
# GPU steps in one call after ../shared/gpu/README.md's set-up runs (the tenth session ran
# check and table; docs/benchmarks/cuda-attention.md, "Tenth session"):
#   bash bench/gpu/next.sh [check] [table] [spread] [fused]
# check: the float64 matrix for the default (and its split + merge form); table: the goal
# cells with the default (lean where xred applies), xred and mma side by side; spread:
# whether slow SMs are slow every launch; fused: the fused form with and without a tiny
# kernel between layers.
. bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for step in "$@"; do
  case $step in
    check)
      CHECK_NATIVES=auto3,auto3s bash bench/gpu/kernel.sh check | tail -4 ;;
    table)
      timeout 400 python -m slabserve.bench.cuda_kernel --table --natives auto3,xred3,mma3 --repeat 4 \
        --batches ${NEXT_BATCHES:-4,8,16} --ctxs ${NEXT_CTXS:-16384,32768} \
        --out "$OUT/next-table" > "$OUT/next-table.log" 2>&1
      grep -v "^{" "$OUT/next-table.log" | grep -v -- "--:" ;;
    spread)
      timeout 200 python -m slabserve.bench.block_stamps --cells 8:16384:0,4:32768:0 --sm-report \
        --evals 6 > "$OUT/spread.log" 2>&1
      grep -v "^{" "$OUT/spread.log" | tail -4 ;;
    fused)
      for f in "--fused" "--fused --gap-op" ""; do
        n=$(echo "x$f" | tr -d ' -')  # file names without spaces (they come back)
        nvidia-smi --query-gpu=clocks.sm --format=csv,noheader -lms 50 > "$OUT/clock-$n.txt" &
        clk=$!
        timeout 100 python -m slabserve.bench.block_stamps --cells 8:16384:0 $f > "$OUT/fused-$n.log" 2>&1
        kill $clk
        echo "== [$f] SM clock MHz (median): $(sort -n "$OUT/clock-$n.txt" | awk '{a[NR]=$1} END {print a[int(NR/2)+1]}')"
        grep -v "^{" "$OUT/fused-$n.log" | tail -1
      done ;;
  esac
done

#!/usr/bin/env bash
# MLX's CUDA graph batching (MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER: ops recorded per
# CUDA graph before it is launched, default 20) against a decode step's host cost and the
# kernel's per-layer chained cost, plus the kernel's warp stall reasons under ncu (issue 7).
# After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/graphs.sh [split] [chain] [stalls]
. bench/gpu/env.sh
ENVS=${GRAPH_ENVS:-"default MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=5 MLX_MAX_OPS_PER_BUFFER=60"}
for step in "$@"; do
  case $step in
    split)  # decode x8 at 4000 and 2 / 8 prefill rows of 2048, build vs eval, per setting
      for e in $ENVS; do
        [ "$e" = default ] && e=MLX_GRAPH_DEFAULT=1
        echo "== $e"
        env "$e" timeout 120 python -m slabserve.bench.host_split --model embedded:qwen2.5-0.5b \
          --dtype bfloat16 --decodes 8 --ctxs 16,4000 --rows 2,8 2>&1 | grep "^|" | tail -4
      done ;;
    chain)  # per layer, 16 layers chained, at the goal cells, per setting
      for e in ${CHAIN_ENVS:-default MLX_MAX_OPS_PER_BUFFER=2 MLX_USE_CUDA_GRAPHS=0}; do
        [ "$e" = default ] && e=MLX_GRAPH_DEFAULT=1
        echo "== $e"
        env "$e" timeout 200 python -m slabserve.bench.cuda_kernel --table --natives async3 \
          --batches 4,8,16 --ctxs 16384,32768 > "$OUT/chain-${e//=/-}.log" 2>&1
        grep "^|" "$OUT/chain-${e//=/-}.log" | tail -7
      done ;;
    stalls)  # why warps wait: ncu stall reasons per issued instruction, natural clocks
      for v in ${STALL_NATIVES:-async3 mma3}; do
        timeout 150 ncu --clock-control none --kernel-name regex:slabserve_pooled_split \
          --launch-skip 2 --launch-count 1 --csv \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed" \
          python -m slabserve.bench.ncu_cell --natives $v > "$OUT/stalls-$v.csv" 2>&1
        echo "== $v"
        python - "$OUT/stalls-$v.csv" <<'PY'
import csv, sys
lines = [s for s in open(sys.argv[1]) if s.startswith('"')]
rows = list(csv.DictReader(lines))
vals = {r["Metric Name"]: r["Metric Value"] for r in rows}
def num(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0
for k in sorted(vals, key=lambda k: -num(vals[k])):
    if num(vals[k]) >= 0.05:
        print(f"{k.replace('smsp__average_warps_issue_stalled_', 'stall ')}: {vals[k]}")
PY
      done ;;
  esac
done

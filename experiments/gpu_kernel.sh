#!/usr/bin/env bash
# The CUDA kernel's checks and timings in one GPU call, from the repository root:
#   bash experiments/gpu_kernel.sh [check] [table] [shapes] [int8] [int8test] [ncu] [ncutime]
#                                  [stamps] [timeline]
# Needs MLX's CUDA build importable: in /tmp/site (added to PYTHONPATH below) or installed.
# Logs and JSON go under $OUT (default /tmp/out); short tables are printed last.
#   check:    the float64 matrix (bench.cuda_kernel --check), 8 shards in parallel
#   table:    per layer, 16 layers chained, and marginal cost (--repeat 4), at the goal cells
#   shapes:   other head shapes and dtypes, fewer cells and layers
#   int8:     float16 vs int8 native per layer (bench.cuda_kernel --int8), with the int8 forms
#             of INT8_EXTRA (default s,f,c5,c10,c16: merge split / fused, chunk counts)
#   int8test: tests/test_cuda_int8.py (the int8 kernel against float64; CUDA cases)
#   ncu:      Nsight Compute sections of the split kernel at B=8 / 16k (needs ncu)
#   ncutime:  every kernel's duration at the GPU's own clocks, with MLX SDPA (needs ncu)
#   stamps:   per-block timer marks (experiments.block_stamps)
#   timeline: host lead, kernels, gaps and tail per layer (experiments.timeline; PyTorch)
# NATIVES (default auto,mma,lean), CHECK_NATIVES (default auto,auto3s): bench.cuda_kernel names.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export SLABSERVE_CACHE_DIR=${SLABSERVE_CACHE_DIR:-/tmp/sscache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
NAT=${NATIVES:-auto,mma,lean}
K="python -m slabserve.bench.cuda_kernel"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
for step in "$@"; do
  case $step in
    check)
      for k in 0 1 2 3 4 5 6 7; do
        timeout 400 $K --check --natives "${CHECK_NATIVES:-auto,auto3s}" --shard $k/8 \
          --out "$OUT/check$k" > "$OUT/check$k.log" 2>&1 &
      done
      wait
      cat "$OUT"/check*.log | grep -v "^#" | sort | uniq > "$OUT/check.txt"
      echo "ok cases: $(grep -c " ok$" "$OUT/check.txt")"; grep -v " ok$" "$OUT/check.txt" | head -20 ;;
    table)
      timeout 420 $K --table --natives "$NAT" --repeat 4 --batches 4,8,16 --ctxs 16384,32768 \
        --out "$OUT/table" > "$OUT/table.log" 2>&1
      grep -v "^{" "$OUT/table.log" | tail -45 ;;
    shapes)
      timeout 420 $K --table --natives "$NAT" --layers 8 --batches 1,8,16 --ctxs 4096,16384 \
        --shapes 32/8/128/bf16,14/2/64/bf16,32/8/64/f32 --out "$OUT/shapes" > "$OUT/shapes.log" 2>&1
      grep -v "^{" "$OUT/shapes.log" | tail -45 ;;
    int8)
      timeout 400 $K --int8 --batches "${INT8_BATCHES:-8,16}" --ctxs 16384,32768 --repeat 4 \
        --int8-extra "${INT8_EXTRA:-s,f,c5,c10,c16}" --out "$OUT/int8" > "$OUT/int8.log" 2>&1
      grep -v "^{" "$OUT/int8.log" | tail -40 ;;
    int8test)
      timeout 300 python -m pytest -q -p no:cacheprovider tests/test_cuda_int8.py \
        > "$OUT/int8test.log" 2>&1
      tail -3 "$OUT/int8test.log" ;;
    ncu)
      for v in ${NAT//,/ }; do
        timeout 150 ncu --kernel-name regex:slabserve_pooled_split --launch-skip 2 \
          --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section LaunchStats \
          python -m experiments.ncu_cell --natives "${v}s" > "$OUT/ncu-$v.txt" 2>&1
        echo "== $v"
        grep -E "Duration|Throughput|Achieved Occupancy|Registers|Warp Cycles|L2 Hit" "$OUT/ncu-$v.txt" | head -20
      done ;;
    ncutime)
      for cell in 8:16384 16:32768 4:16384; do
        timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
          python -m experiments.ncu_cell --natives "$NAT" --sdpa --batch "${cell%:*}" \
          --ctx "${cell#*:}" > "$OUT/ncut-${cell/:/-}.csv" 2>&1
        echo "== B:ctx $cell (us)"
        python -m experiments.ncu_times "$OUT/ncut-${cell/:/-}.csv"
      done ;;
    stamps)
      timeout 300 python -m experiments.block_stamps > "$OUT/stamps.log" 2>&1
      grep -v "^{" "$OUT/stamps.log" | tail -8 ;;
    timeline)
      timeout 300 python -m experiments.timeline --natives "$NAT" --out "$OUT/timeline" \
        > "$OUT/timeline.log" 2>&1
      grep -v "^{" "$OUT/timeline.log" | tail -20 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# Issue 7 on the lent GPU machine (after ../shared/gpu/README.md's two set-up runs, carrying
# .gpu-extra too: prometheus-client and tqdm for the server):
#   bash bench/gpu/kernel.sh [check] [table] [shapes] [smoke]
# Writes logs and JSON under $OUT; prints short tables last.
. bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import mlx.core as mx, mlx_lm, fastapi, uvicorn, httpx, prometheus_client; print('mlx', mx.__version__, mx.default_device())"
NAT=${NATIVES:-async3,async3f,mma3}
for step in "$@"; do
  case $step in
    check)  # the float64 matrix, 8 shards in parallel
      for k in 0 1 2 3 4 5 6 7; do
        timeout 400 python -m slabserve.bench.cuda_kernel --check --natives ${CHECK_NATIVES:-mma3} --shard $k/8 \
          --out "$OUT/check$k" > "$OUT/check$k.log" 2>&1 &
      done
      wait
      cat "$OUT"/check*.log | grep -v "^#" | sort | uniq > "$OUT/check.txt"
      grep -c " ok$" "$OUT/check.txt"; grep -v " ok$" "$OUT/check.txt" | head -20 ;;
    table)
      timeout 420 python -m slabserve.bench.cuda_kernel --table --natives "$NAT" --out "$OUT/table" \
        > "$OUT/table.log" 2>&1
      grep -v "^{" "$OUT/table.log" | tail -45 ;;
    shapes)  # other shapes and dtypes, fewer cells and layers
      timeout 420 python -m slabserve.bench.cuda_kernel --table --natives "$NAT" --layers 8 \
        --batches 1,8,16 --ctxs 4096,16384 \
        --shapes 32/8/128/bf16,14/2/64/bf16,32/8/64/f32 --out "$OUT/shapes" \
        > "$OUT/shapes.log" 2>&1
      grep -v "^{" "$OUT/shapes.log" | tail -45 ;;
    ncu)  # Nsight Compute on B=8 ctx 16k: the main kernel of each variant (after warm-up)
      for v in async3 mma3; do
        timeout 150 ncu --kernel-name regex:slabserve_pooled_split --launch-skip 2 \
          --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section LaunchStats \
          python -m slabserve.bench.ncu_cell --natives $v > "$OUT/ncu-$v.txt" 2>&1
        grep -E "Duration|Throughput|Achieved Occupancy|Registers|Stall|Issued|Warp Cycles|L2 Hit|Block Limit|Waves" "$OUT/ncu-$v.txt" | head -40
      done ;;
    variants)  # block shapes of the FMA/mma variants at the goal cells (NATIVES=...)
      timeout 500 python -m slabserve.bench.cuda_kernel --table --natives "$NAT" --batches 4,8,16 \
        --ctxs 16384,32768 --out "$OUT/variants" ${VARIANT_ARGS:-} > "$OUT/variants.log" 2>&1
      head -1 "$OUT/variants.log"
      python - "$OUT/variants.log" <<'PY'
import json, sys
rows = [json.loads(s) for s in open(sys.argv[1]) if s.startswith("{")]
names = [k[:-3] for k in rows[0] if k.endswith("_us") and k not in ("floor_us",)]
print("| B | ctx | " + " | ".join(names) + " |")
for r in rows:
    print(f"| {r['B']} | {r['ctx']} | " + " | ".join(
        f"{r[n + '_us']:.1f} ({r[n + '_us'] / r['floor_us']:.2f})" for n in names) + " |")
PY
      ;;
    ncutime)  # every kernel's duration at the GPU's own clocks (no ncu clock locking)
      for cell in ${NCU_CELLS:-8:16384 16:32768 4:16384}; do
        set -- ${cell/:/ }
        timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
          python -m slabserve.bench.ncu_cell --natives ${NCU_NATIVES:-async3,async3f,mma3} --sdpa \
          --batch $1 --ctx $2 > "$OUT/ncut-$1-$2.csv" 2>&1
        echo "== B=$1 ctx=$2 (us)"
        python -m slabserve.bench.ncu_times "$OUT/ncut-$1-$2.csv"
      done ;;
    step)  # one decode step as the server runs it, per path (Llama-3.2-1B shape)
      timeout 200 python -m slabserve.bench.decode_step --embedded llama-3.2-1b:bfloat16 --batches 1,8,16 \
        --contexts 4k,16k,32k --steps 10 --out "$OUT/decode_step" > "$OUT/decode_step.log" 2>&1
      tail -12 "$OUT/decode_step.log" ;;
    smoke)  # our server and mlx_lm.server on a realistic shape, two cells
      timeout 400 python -m slabserve.cli loadtest --compare --configs auto,mlx_lm \
        --embedded qwen2.5-0.5b:bfloat16 --contexts 1k,4k --concurrency 1,8 --max-tokens 64 \
        --requests 3,8 --warmup 1 --duration 40 --out "$OUT/smoke" --no-progress \
        > "$OUT/smoke.log" 2>&1
      tail -30 "$OUT/smoke.log" ;;
  esac
done

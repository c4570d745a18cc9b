#!/usr/bin/env bash
# Ninth session: the "tail" variant (fixed chunks, then the rest of each sequence stolen
# slice by slice) against the default, on the lent GPU (after the set-up runs of
# ../shared/gpu/README.md).  bash bench/gpu/tail.sh [check] [stamps] [table]
. bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for step in "$@"; do
  case $step in
    check)
      CHECK_NATIVES=${TAIL_CHECK:-tail3,tail3s} bash bench/gpu/kernel.sh check ;;
    stamps)
      for v in ${STAMP_VARIANTS:-auto tail}; do
        timeout 200 python -m bench.block_stamps --cells ${STAMP_CELLS:-8:16384:0,8:32768:0,4:32768:0} \
          --variant $v > "$OUT/stamps-$v.log" 2>&1
        echo "== $v"; grep -v "^{" "$OUT/stamps-$v.log" | tail -6
      done ;;
    table)
      timeout 500 python -m bench.cuda_kernel --table --natives "${TAIL_NATIVES:-auto3,tail3}" \
        --repeat 4 --batches ${TAIL_BATCHES:-4,8,16} --ctxs ${TAIL_CTXS:-16384,32768} \
        --out "$OUT/tail-table" > "$OUT/tail-table.log" 2>&1
      grep -v "^{" "$OUT/tail-table.log" | tail -60 ;;
  esac
done

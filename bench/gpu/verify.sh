#!/usr/bin/env bash
# Verify the default ("auto") variant on the GPU: the float64 matrix, then per-layer tables
# for the two head shapes it splits on, "auto3" beside "async3".  Prints short tables.
. bench/gpu/env.sh
for k in 0 1 2 3 4 5 6 7; do
  timeout 300 python -m slabserve.bench.cuda_kernel --check --natives auto3 --shard $k/8 > /tmp/vcheck$k.log 2>&1 &
done
wait
cat /tmp/vcheck*.log | grep -v "^#" | sort | uniq > $OUT/verify-check.txt
echo "ok cases: $(grep -c ' ok$' $OUT/verify-check.txt)"; grep -v " ok$" $OUT/verify-check.txt | head
timeout 280 python -m slabserve.bench.cuda_kernel --table --natives auto3,async3 --batches 1,4,8,16 \
  --ctxs 4096,16384,32768 --shapes 14/2/64/bf16,32/8/64/f16 2>&1 | grep -v "^{" > $OUT/verify-table.txt
cat $OUT/verify-table.txt

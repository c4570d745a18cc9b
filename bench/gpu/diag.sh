#!/usr/bin/env bash
# GPU diagnosis of slow prefill-heavy steps under concurrency (issue 5) and per-step decode
# timings (issue 7).  After the set-up runs (../shared/gpu/README.md), carrying .gpu-extra:
#   bash bench/gpu/diag.sh
. bench/gpu/env.sh
B="python -m slabserve.bench.burst --model embedded:qwen2.5-0.5b --dtype bfloat16 --requests 8 --prompt 1000 --max-tokens 32 --rounds 3 --show 12"
echo "== burst default (max_step_tokens 512, chunk 256)"; timeout 120 $B 2>&1 | tail -16
echo "== burst bucket 1024"; SLABSERVE_PREFILL_KV_BUCKET=1024 timeout 120 $B --show 0 2>&1 | tail -4
echo "== burst step 4096 chunk 2048"; timeout 120 $B --max-step-tokens 4096 --prefill-chunk 2048 --show 6 2>&1 | tail -10
echo "== burst step 4096 chunk 2048 bucket 1024"; SLABSERVE_PREFILL_KV_BUCKET=1024 timeout 120 $B --max-step-tokens 4096 --prefill-chunk 2048 --show 0 2>&1 | tail -4
echo "== prefill chunks"; timeout 150 python -m slabserve.bench.prefill_chunks --prompt 8192 --max-kv 8192 --out "$OUT/prefill_chunks.json" > "$OUT/prefill_chunks.log" 2>&1; tail -22 "$OUT/prefill_chunks.log"
echo "== decode step"; timeout 150 python -m slabserve.bench.decode_step --embedded llama-3.2-1b:bfloat16 --batches 1,8,16 --contexts 4k,16k --steps 10 --out "$OUT/decode_step" > "$OUT/decode_step.log" 2>&1; tail -14 "$OUT/decode_step.log"
echo "== kernel variants"; timeout 150 python -m slabserve.bench.cuda_kernel --table --natives async3,async4,mma2,mma4 --batches 8,16 --ctxs 16384,32768 --out "$OUT/variants" > "$OUT/variants.log" 2>&1; grep -v "^{" "$OUT/variants.log" | tail -30

#!/usr/bin/env bash
# Decode steps on the lent GPU (recipe: /work/shared/gpu/README.md; run from the repo root
# after the two-part MLX install; in ./.extra the contents of llguidance's abi3 wheel and
# pytest-asyncio, which that machine lacks: the async tests fail there without it):
#   tests    the CUDA-side tests of decode steps (step graphs, stages, kernels, pool writes)
#            and one step's graph nodes (python -m experiments.step_profile);
#   phases   per-phase step times, eager vs compiled stages vs step graphs (decode-phases),
#            Llama-3.2-1B and Qwen2.5-0.5B shapes in bfloat16, with the device's time
#            ($PHASES_FLAGS, default --device-time);
#   compare  streamed load, ours vs ours without async scheduling (sync) vs mlx_lm.server,
#            concurrency 1 at 1k / 4k / 16k; the same plus a second process of ours (twin)
#            at concurrency 8, 1k; models from $MODELS (default both shapes);
#   prefix   the prefix cache's host costs (slabserve bench prefix-lookup), then cache on vs
#            off with nothing shared, two engines in lockstep in one process
#            (slabserve bench prefix-overhead), Llama-3.2-1B shape, 4k, concurrency 8;
#   graphs   decode-phases (Llama-3.2-1B shape) once per MLX CUDA graph setting
#            (MLX_MAX_OPS_PER_BUFFER 50 / 100 / 250 / 8, MLX_USE_CUDA_GRAPHS=0), one process each;
#   jit      concurrency 8 at 1k, Llama-3.2-1B shape: ours then a second process of ours
#            (twin), MLX's on-disk kernel cache emptied first, start-up capture off then on
#            (--cuda-graph-max-bs 0 / default): kernels compiled and cached by the first
#            process are what the second one reads;
#   twins    ours (auto), a second process of ours (twin) and mlx_lm.server at concurrency
#            1 and 8, 1k and 16k, Llama-3.2-1B shape, servers logging at info (captures);
#   rows     the few-rows projection kernel (engine/rows_matmul.py): its CUDA tests, chained
#            projections against MLX's matmul (experiments/small_m_matmul.py), decode-phases
#            without and with it, and the server without it (auto) and with it (rows);
#   c1       a one-stream server step's phases per serve-flag variant: the engine built as
#            `slabserve serve` builds it, per variant of serve flags, one request at a time
#            through the serving loop, then the same runner in decode-phases' overlap loop
#            (python -m experiments.c1_wait);
#   inplace  in-place K/V writes (kvcache/inplace.py, ADR 0014): their CUDA tests with the
#            step graph and async scheduling ones, and c1_wait's loop with and without them
#            at a 2 and an 8 GiB pool;
#   pin      six processes of one configuration (c1_wait's loop, 2 GiB pool, 16 requests
#            8 at a time: $PIN_CONC, $PIN_REQ), every other one with its engine thread alone
#            on core 2: is the spread between processes at concurrency 8 core placement?
#   gcache   pin's six processes, MLX's CUDA graph cache at its default 400 graphs and at
#            4000 alternating (MLX_CUDA_GRAPH_CACHE_SIZE): is the spread graph-cache churn?
#   first    the in-place K/V writes' CUDA tests with the step graph, async scheduling and
#            decode-phases ones, then Qwen2.5-0.5B's B=1 / 1k phases with --device-time;
#   fusedab  Llama-3.2-1B's one-stream step with lean's merge split at B=1 (the plan) and
#            fused at any chunk count (c1_wait --plan fused_max_chunks=64), alternating;
#   budget   MLX's CUDA graph byte budget (slabserve.mlxgraphs, ADR 0015): six processes of
#            c1_wait's loop at the device-sized pool, MLX's own H100 value
#            (MLX_MAX_MB_PER_BUFFER=1000) and slabserve's (unbounded) alternating;
#   bias     a biased projection (Qwen2's q/k/v) as mx.addmm against a matmul and an add,
#            Qwen2.5-0.5B shapes chained over 24 layers (python -m experiments.bias_matmul);
#   grid     the native kernel's device time per launch against its grid's chunk count
#            and merge form (bench cuda-kernel --grid), 14/2 and 32/8 heads;
#   kernels  one-stream decode steps' device time kernel by kernel (PyTorch's profiler),
#            Llama-3.2-1B and Qwen2.5-0.5B shapes, 1k (python -m experiments.step_kernels);
#   exit     `slabserve serve` answers one request, then SIGTERM: its exit status and any
#            C++ terminate (c1_wait's processes end with "terminate called without an active
#            exception" on CUDA, not on CPU);
#   prehost  a prefill chunk's host build and launch against its wall time, 32-2048 tokens,
#            both shapes (python -m experiments.prefill_host): what compiling prefill could save;
#   ttft     one-stream TTFT and steps of 4k prompts at a 1 GiB pool and at the pool sized
#            from the device (one 2 GiB slab a layer and side), prefill chunks written in
#            place and by scatter (--no-inplace-kv-writes, which scatters decode too: ADR 0014);
#   stall    three processes of ours at concurrency 1 and 8, 1k, Llama-3.2-1B shape, with each
#            server's decode step phases and engine-thread CPU (stall = off the CPU), then
#            the same engine in process without HTTP (bench burst, 1 and 8 requests);
#   sampler  one batch's sampling, eager vs the compiled sampler (bench sampler), B 1 / 8 / 32;
#   kernel   the native kernel's per-layer time against the K/V floor (bench cuda-kernel
#            --table), batches 1 / 8 / 16 at 1k / 16k / 32k;
#   int8     the int8 kernel against float16's and the int8 floor (bench cuda-kernel --int8),
#            batches 8 / 16 at 16k / 32k, with forced chunk counts ($INT8_EXTRA);
#   ties     where the tests' tiny models' greedy tokens leave mlx-lm's on this device, how
#            close mlx-lm's own top two logits were (python -m experiments.tie_margin);
#   spread   four processes of the same decode-phases cell, two of them pinned to one
#            core (taskset), to see how far processes of one tree differ.
# Results under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site:$PWD/.extra" PYTHONUNBUFFERED=1 SLABSERVE_CACHE_DIR=/tmp/sscache
OUT="${OUT:-out}"
SS="python -m slabserve.cli"
for STEP in "${@:-phases}"; do
  case "$STEP" in
  tests)
    # the kernels' float64 cases last: on the lent host they alone take over 400 s
    timeout -k 5 ${TESTS_S:-480} python -m pytest -q -p no:cacheprovider tests/test_step_graph.py \
      tests/test_async_scheduling.py tests/test_inplace_write.py tests/test_inplace_prefill.py \
      tests/test_device_table.py tests/test_staged.py tests/test_host_arrays.py \
      tests/test_pool.py tests/test_sampling_graph.py tests/test_cuda_int8.py \
      tests/test_cuda_variants.py tests/test_native_cuda.py > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"; tail -1 "$OUT/tests.log"
    for f in "" --stages; do
      timeout 60 python -m experiments.step_profile --steps 20 --no-cprofile $f \
        > "$OUT/nodes$f.log" 2>&1
      grep -E '^nodes|^build' "$OUT/nodes$f.log" | cut -c1-160
    done ;;
  phases)
    for m in ${MODELS:-llama-3.2-1b qwen2.5-0.5b}; do
      timeout 300 $SS bench decode-phases --embedded "$m:bfloat16" --batches 1,8,32 \
        --contexts ${CONTEXTS:-1k,4k,16k} --steps 10 --warmup 3 ${PHASES_FLAGS:---device-time} \
        --out "$OUT/phases-$m" \
        > "$OUT/phases-$m.log" 2>&1
      tail -28 "$OUT/phases-$m.log"
    done ;;
  compare)
    for m in ${MODELS:-llama-3.2-1b qwen2.5-0.5b}; do
      timeout 300 $SS loadtest --compare --embedded $m:bfloat16 --configs auto,mlx_lm \
        ${C1_VARIANTS---variant sync=--no-async-scheduling} --contexts 1k,4k,16k --concurrency 1 \
        --max-tokens 64 --requests 6 --no-progress --out "$OUT/c1-$m" > "$OUT/c1-$m.log" 2>&1
      timeout 250 $SS loadtest --compare --embedded $m:bfloat16 --configs auto,mlx_lm \
        ${C8_VARIANTS---variant sync=--no-async-scheduling} --variant twin= --contexts 1k --concurrency 8 \
        --max-tokens 64 --requests 16 --no-progress --out "$OUT/c8-$m" > "$OUT/c8-$m.log" 2>&1
      for g in c1 c8; do sed -n '/## Comparison/,/## Goals/p' "$OUT/$g-$m/results.md"; done
    done ;;
  prefix)
    timeout 60 $SS bench prefix-lookup --out "$OUT/prefix-lookup" > "$OUT/prefix-lookup.log" 2>&1
    cat "$OUT/prefix-lookup.log"
    timeout 300 $SS bench prefix-overhead --embedded llama-3.2-1b:bfloat16 --out "$OUT/prefix" \
      > "$OUT/prefix.log" 2>&1
    tail -17 "$OUT/prefix.log" ;;
  graphs)
    for setting in default MLX_MAX_OPS_PER_BUFFER=50 MLX_MAX_OPS_PER_BUFFER=100 \
        MLX_MAX_OPS_PER_BUFFER=250 MLX_USE_CUDA_GRAPHS=0 MLX_MAX_OPS_PER_BUFFER=8; do
      envs=(); [[ $setting != default ]] && envs=("$setting")
      tag=${setting//=/-}
      echo "== $setting"
      env "${envs[@]}" timeout 100 $SS bench decode-phases --embedded llama-3.2-1b:bfloat16 \
        --batches 1,8,32 --contexts 1k,16k --steps 10 --warmup 3 --out "$OUT/graphs-$tag" \
        > "$OUT/graphs-$tag.log" 2>&1
      grep -E "^\| [0-9]+ \| [0-9]+ \|" "$OUT/graphs-$tag.log" | tail -12
    done ;;
  jit)
    ptx="${TMPDIR:-/tmp}/mlx"
    for capture in 0 default; do
      rm -rf "$ptx"; args=(--server-arg=--log-level=info)
      [[ $capture == 0 ]] && args+=(--server-arg=--cuda-graph-max-bs=0)
      timeout 280 $SS loadtest --compare --embedded llama-3.2-1b:bfloat16 --configs auto \
        --variant twin= --contexts 1k --concurrency 8 --max-tokens 64 --requests 16 \
        --no-progress "${args[@]}" --out "$OUT/jit-$capture" > "$OUT/jit-$capture.log" 2>&1
      echo "== capture $capture: $(find "$ptx" -name '*.ptx' 2>/dev/null | wc -l) kernels cached"
      grep -hE "captured decode|WARNING|rror" "$OUT/jit-$capture"/server-*.log | cut -c1-200
      grep -E "^\| 1024 \| 8 \|" "$OUT/jit-$capture/results.md"
      rm -f "$OUT/jit-$capture"/*.{png,csv,json}
    done ;;
  twins)
    timeout ${TWINS_S:-540} $SS loadtest --compare --embedded llama-3.2-1b:bfloat16 \
      --configs auto,mlx_lm --variant twin= --contexts ${TWIN_CTX:-1k,16k} \
      --concurrency ${TWIN_CONC:-1,8} --max-tokens 64 --requests ${TWIN_REQ:-8,32} \
      --no-progress --server-arg=--log-level=info \
      --out "$OUT/twins" > "$OUT/twins.log" 2>&1
    echo "twins rc=$?"
    grep -hE "captured decode|WARNING|rror" "$OUT/twins"/server-*.log | cut -c1-200
    sed -n '/## Comparison/,/## Goals/p' "$OUT/twins/results.md"
    rm -f "$OUT/twins"/*.{png,csv,json} ;;
  rows)
    timeout ${ROWS_TESTS_S:-70} python -m pytest -q -p no:cacheprovider tests/test_rows_matmul.py \
      > "$OUT/rows-tests.log" 2>&1
    echo "rows tests rc=$?"; grep -E "^(FAILED|ERROR)|Error" "$OUT/rows-tests.log" | head -5
    tail -1 "$OUT/rows-tests.log"
    for r in --no-rows-matmul --rows-matmul; do
      timeout ${ROWS_PHASES_S:-90} $SS bench decode-phases --embedded llama-3.2-1b:bfloat16 \
        --batches 1,4,8,16 --contexts 1k --steps 10 --warmup 3 $r --out "$OUT/phases$r" \
        > "$OUT/phases$r.log" 2>&1
      echo "phases $r rc=$?"; grep -E "^\| [0-9]+ \| [0-9]+ \| (graph|overlap)" "$OUT/phases$r.log"
    done
    timeout ${ROWS_LT_S:-170} $SS loadtest --compare --embedded llama-3.2-1b:bfloat16 \
      --configs auto --variant rows=--rows-matmul --contexts 1k --concurrency 1,4,8 \
      --max-tokens 64 --requests 8,16,16 --no-progress --out "$OUT/rows-lt" \
      > "$OUT/rows-lt.log" 2>&1
    echo "rows loadtest rc=$?"; sed -n '/## Comparison/,/## Goals/p' "$OUT/rows-lt/results.md"
    grep -hE "rows matmul|WARNING|rror" "$OUT/rows-lt"/server-*.log | cut -c1-200 | head -5
    rm -f "$OUT/rows-lt"/*.{png,csv}
    timeout ${ROWS_MICRO_S:-50} python -m experiments.small_m_matmul --repeat 15 \
      > "$OUT/small_m.log" 2>&1
    echo "small_m rc=$?"; tail -25 "$OUT/small_m.log" ;;
  inplace)
    timeout ${INPLACE_TESTS_S:-200} python -m pytest -q -p no:cacheprovider \
      tests/test_inplace_write.py tests/test_inplace_prefill.py tests/test_step_graph.py \
      tests/test_async_scheduling.py \
      > "$OUT/inplace-tests.log" 2>&1
    echo "inplace tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/inplace-tests.log" | head
    tail -1 "$OUT/inplace-tests.log"
    timeout ${C1_S:-150} python -m experiments.c1_wait --no-direct --variants \
      "|--no-inplace-kv-writes|--kv-budget 8G|--kv-budget 8G --no-inplace-kv-writes" \
      > "$OUT/c1.log" 2>&1
    echo "c1 rc=$?"; grep -vE "^(INFO|WARNING)" "$OUT/c1.log" | tail -12 ;;
  pin)
    for i in 1 2 3; do
      for p in "" "--pin-engine 2"; do
        echo "process $i ${p:-unpinned}"
        timeout 90 python -m experiments.c1_wait --no-direct --variants "" \
          --concurrency ${PIN_CONC:-8} --requests ${PIN_REQ:-16} $p 2>&1 | grep -E "^  loop"
      done
    done ;;
  gcache)
    for i in 1 2 3; do
      for n in 400 4000; do
        echo "process $i MLX_CUDA_GRAPH_CACHE_SIZE=$n"
        MLX_CUDA_GRAPH_CACHE_SIZE=$n timeout 90 python -m experiments.c1_wait --no-direct \
          --variants "" --concurrency ${PIN_CONC:-8} --requests ${PIN_REQ:-16} 2>&1 | grep -E "^  loop"
      done
    done ;;
  first)
    # the first call of a GPU session (not run yet): the in-place writes' CUDA tests, then
    # where Qwen2.5-0.5B's one-stream device time goes and what each suspect's fix gives
    MLX_MAX_MB_PER_BUFFER=1073741824 timeout ${FIRST_TESTS_S:-170} python -m pytest -q \
      -p no:cacheprovider tests/test_inplace_write.py tests/test_inplace_prefill.py \
      tests/test_step_graph.py tests/test_async_scheduling.py tests/test_bench_decode_phases.py \
      > "$OUT/first-tests.log" 2>&1
    echo "tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/first-tests.log" | head
    tail -1 "$OUT/first-tests.log"
    timeout 90 $SS bench decode-phases --embedded qwen2.5-0.5b:bfloat16 --batches 1 \
      --contexts 1k --steps 15 --device-time --out "$OUT/qwen-phases" > "$OUT/qwen-phases.log" 2>&1
    echo "phases rc=$?"; tail -6 "$OUT/qwen-phases.log" ;;
  fusedab)
    # lean's merge at B=1: split (the plan) against fused at any chunk count, one stream,
    # alternating processes, each after the host probe (its speed moves)
    for i in 1 2 3; do
      for p in "" "--plan fused_max_chunks=64"; do
        python -c "from slabserve.loadtest.hostprobe import host_probe_ms as h; print(f'host probe {h():.1f} ms')"
        timeout 80 python -m experiments.c1_wait --no-direct --variants "" $p 2>&1 \
          | grep -E "^  loop" | sed "s/^/process $i ${p:-split} /"
      done
    done ;;
  budget)
    for i in 1 2 3; do
      for mb in 1000 $((1 << 30)); do
        MLX_MAX_MB_PER_BUFFER=$mb timeout ${BUDGET_C1_S:-80} python -m experiments.c1_wait \
          --kv-budget device --no-direct --variants "" 2>&1 | grep -E "^  loop" \
          | sed "s/^/process $i budget $mb /"
      done
    done ;;
  grid)
    timeout ${GRID_S:-300} $SS bench cuda-kernel --grid --shapes 14/2/64/bf16,32/8/64/bf16 \
      --batches 1,8 --ctxs 1024,16384 --out "$OUT/grid" 2>&1 \
      | grep -vE "^(INFO|WARNING)|UserWarning|_warn_once" | tee "$OUT/grid.txt" ;;
  bias)
    timeout ${BIAS_S:-120} python -m experiments.bias_matmul 2>&1 | tail -20 ;;
  exit)
    $SS serve --model embedded:llama-3.2-1b --dtype bfloat16 --port 8765 --kv-budget 2G \
      > "$OUT/exit.log" 2>&1 &
    pid=$!
    python - <<'PY'
import time, httpx
for _ in range(180):
    try:
        if httpx.get("http://127.0.0.1:8765/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(1)
model = httpx.get("http://127.0.0.1:8765/v1/models").json()["data"][0]["id"]
r = httpx.post("http://127.0.0.1:8765/v1/completions", timeout=60,
               json={"model": model, "prompt": "hello", "max_tokens": 8})
print("completion", r.status_code)
PY
    kill -TERM $pid; wait $pid; echo "serve exit rc=$?"
    grep -iE "terminate|abort|Traceback" "$OUT/exit.log" | head -5 ;;
  prehost)
    for m in ${MODELS:-llama-3.2-1b qwen2.5-0.5b}; do
      timeout ${PREHOST_S:-120} python -m experiments.prefill_host --embedded $m:bfloat16 2>&1 \
        | grep -vE "^(INFO|WARNING)" | tail -7
    done ;;
  kernels)
    timeout ${KERNELS_S:-200} python -m experiments.step_kernels --batch ${KERNELS_B:-1} \
      > "$OUT/step_kernels.log" 2>&1
    echo "kernels rc=$?"; grep -vE "^(INFO|WARNING)" "$OUT/step_kernels.log" | tail -50 ;;
  ttft)
    for kv in 1G device; do
      timeout ${TTFT_S:-150} python -m experiments.c1_wait --kv-budget $kv --prompt 4000 \
        --no-direct --variants "|--no-inplace-kv-writes" 2>&1 | grep -E "^(==|  loop)" \
        | sed "s/^/$kv /"
    done ;;
  c1)
    timeout ${C1_S:-300} python -m experiments.c1_wait ${C1_ARGS:-} > "$OUT/c1.log" 2>&1
    echo "c1 rc=$?"; cat "$OUT/c1.log" | grep -vE "^(INFO|WARNING)" | tail -40 ;;
  stall)
    timeout ${STALL_S:-300} $SS loadtest --compare --embedded llama-3.2-1b:bfloat16 \
      --configs auto --variant twin= --variant twin2= --contexts 1k --concurrency 1,8 \
      --max-tokens 64 --requests 8,16 --no-progress --out "$OUT/stall" > "$OUT/stall.log" 2>&1
    echo "stall rc=$?"; sed -n '/## Comparison/,/## Goals/p' "$OUT/stall/results.md"
    rm -f "$OUT/stall"/*.{png,csv}
    for n in 1 8; do
      timeout 150 $SS bench burst --model embedded:llama-3.2-1b --dtype bfloat16 --requests $n \
        --prompt 1000 --max-tokens 64 --rounds 3 --show 0 > "$OUT/burst-$n.log" 2>&1
      echo "burst $n (in process, no HTTP)"; grep -E "^round" "$OUT/burst-$n.log" | cut -c1-400
    done ;;
  sampler)
    timeout -k 5 ${SAMPLER_S:-150} $SS bench sampler --out "$OUT/sampler" > "$OUT/sampler.log" 2>&1
    echo "sampler rc=$?"; tail -18 "$OUT/sampler.log" ;;
  kernel)
    pgrep -af "pytest|slabserve" | grep -v gpu_step | head -3  # nothing else may run
    timeout ${KERNEL_S:-120} python -m slabserve.bench.cuda_kernel --table --natives auto \
      --batches ${KERNEL_B:-1,8,16} --ctxs ${KERNEL_CTX:-1024,16384,32768} --repeat 2 \
      > "$OUT/kernel.log" 2>&1
    echo "kernel rc=$?"; tail -20 "$OUT/kernel.log" ;;
  int8)
    timeout ${INT8_S:-200} python -m slabserve.bench.cuda_kernel --int8 --batches ${KERNEL_B:-8,16} \
      --ctxs ${KERNEL_CTX:-16384,32768} --repeat 4 --int8-extra ${INT8_EXTRA:-c8,c16,c32} \
      > "$OUT/int8.log" 2>&1
    echo "int8 rc=$?"; tail -24 "$OUT/int8.log" ;;
  ties)
    timeout 120 python -m experiments.tie_margin 2>&1 | grep -E "^(llama|qwen|phi)" ;;
  spread)
    for i in 1 2 3 4; do
      pin=""; [[ $((i % 2)) == 0 ]] && pin="taskset -c 3"
      timeout 100 $pin $SS bench decode-phases --embedded llama-3.2-1b:bfloat16 --batches 1,8 \
        --contexts 1k --steps 30 --warmup 5 --out "$OUT/spread-$i" > "$OUT/spread-$i.log" 2>&1
      echo "process $i ${pin:-unpinned}"; grep -E "^\| (1|8) \| 1024" "$OUT/spread-$i.log" | tail -4
    done ;;
  esac
done

"""A one-stream server's decode step on a GPU, phase by phase, per serve configuration.

Built to find why the server's steps waited for their tokens (0.65-0.86 ms of a 2.9 ms
step on an H100, against 0.08 ms in decode-phases' overlap mode): the scatter writes
copied whole slabs (docs/adr/0014-inplace-kv-writes.md).  Its host ``forward`` then
followed the pool's size through MLX's CUDA graph byte budget
(docs/adr/0015-cuda-graph-budget.md; set ``MLX_MAX_MB_PER_BUFFER`` per process to compare).
This builds the engine as `slabserve serve` does (its flag parser, `configs`,
`build_serving`), once per variant of serve flags, and in each:

- `loop`: `--requests` greedy requests of a `--prompt`-token random prompt, `--concurrency`
  of them in flight at a time (default one after the other), through the serving loop
  (its engine thread; no HTTP): medians of the decode-only steps' phases and the share
  submitted ahead;
- `direct`: the same runner and executor driven like decode-phases' overlap mode on this
  thread (B=1 at the same context, fast-filled blocks), then on a fresh thread.

    python -m experiments.c1_wait --embedded llama-3.2-1b:bfloat16 --kv-budget 2G
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shlex
import statistics
import threading
import time

VARIANTS = ("", "--no-async-scheduling", "--cuda-graph-max-bs 0", "--max-context 4096",
            "--no-kv-preallocate", "--max-running 8")


async def loop_phases(eng, vocab: int, prompt: int, tokens: int, requests: int,
                      concurrency: int = 1) -> dict:
    from slabserve.scheduler.api import Request, SamplingParams
    from slabserve.scheduler.steplog import PHASES

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    prompts = [tuple(rng.randrange(vocab) for _ in range(prompt)) for _ in range(requests)]
    eng.step_log.clear()
    ttft = []
    slots = asyncio.Semaphore(concurrency)  # at most `concurrency` requests in flight

    async def one(i: int) -> None:
        async with slots:
            sent, first = time.perf_counter(), True
            async for d in eng.generate(Request(f"c1-{i}", prompts[i], params)):
                if d.token_ids and first:
                    ttft.append(time.perf_counter() - sent)
                    first = False

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - t0
    dec = [r for r in eng.step_log if r.decodes and not r.prefill_tokens]
    out = {p: 1e3 * statistics.median(getattr(r, f"{p}_s") for r in dec) for p in PHASES}
    out["step"] = 1e3 * statistics.median(r.total_s for r in dec)
    out["cpu"] = 1e3 * statistics.median(r.host_cpu_s for r in dec)
    out["ahead"] = sum(r.ahead for r in dec) / len(dec)
    out["tok_s"] = requests * tokens / wall
    out["ttft"] = 1e3 * statistics.median(ttft)
    return out


def direct_phases(eng, ctx: int, steps: int) -> dict:
    """decode-phases' overlap loop on this runner (no serving loop), medians in ms."""
    from slabserve.bench.decode_phases import run_overlap
    from slabserve.bench.decode_step import BenchConfig, fast_fill
    from slabserve.scheduler.api import SamplingParams

    runner, executor = eng.executor.runner, eng.executor
    cfg = BenchConfig(model="x", steps=steps, warmup=3)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    tables = fast_fill(runner, 1, ctx, 0)
    try:
        st, _ = run_overlap(runner, executor, cfg, tables, [1], ctx, params)
    finally:
        for t in tables:
            runner.allocator.free(t)
    med = {p: 1e3 * statistics.median(getattr(s, p) for s in st)
           for p in ("plan", "build", "launch", "sync")}
    med["step"] = 1e3 * statistics.median(s.wall for s in st)
    return med


def pin(cpu: int) -> None:
    """The engine thread (``slabserve-engine``) on ``cpu`` only; every other thread of
    this process on the other cores (Linux: affinity is per thread id)."""
    others = os.sched_getaffinity(0) - {cpu}
    for t in threading.enumerate():
        if t.native_id is not None:
            os.sched_setaffinity(t.native_id, {cpu} if t.name == "slabserve-engine" else others)
    for tid in map(int, os.listdir("/proc/self/task")):  # threads Python does not know (MLX)
        if tid not in {t.native_id for t in threading.enumerate()}:
            os.sched_setaffinity(tid, others)


def on_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()))
    t.start()
    t.join()
    return box["r"]


async def one_variant(argv: list[str], args) -> None:
    from slabserve.build import build_serving
    from slabserve.serve import configs, make_selector, parser

    _, serve_cfg = configs(parser().parse_args(argv))
    eng = build_serving(serve_cfg, make_selector())
    await eng.start()
    if args.pin_engine is not None:  # the engine thread alone on one core, the rest elsewhere
        pin(args.pin_engine)
    try:
        vocab = min(eng.executor.runner.model.args.vocab_size, 30_000)
        r = await loop_phases(eng, vocab, args.prompt, args.tokens, args.requests,
                              args.concurrency)
        print(f"  loop   step {r['step']:.2f} | " + " ".join(
            f"{p} {r[p]:.2f}" for p in ("schedule", "forward", "sample", "wait", "update",
                                        "deliver"))
            + f" | cpu {r['cpu']:.2f} | ahead {100 * r['ahead']:.0f}% | {r['tok_s']:.0f} tok/s"
            f" | TTFT p50 {r['ttft']:.1f} ms",
            flush=True)
    finally:
        await eng.shutdown(10)
    if args.no_direct:
        return
    for where, fn in (("main", lambda: direct_phases(eng, args.prompt, args.steps)),
                      ("thread", lambda: on_thread(
                          lambda: direct_phases(eng, args.prompt, args.steps)))):
        try:
            d = fn()
            print(f"  direct {where:6s} step {d['step']:.2f} | " + " ".join(
                f"{p} {d[p]:.2f}" for p in ("plan", "build", "launch", "sync")), flush=True)
        except Exception as e:  # a variant that cannot run directly says why
            print(f"  direct {where}: {type(e).__name__}: {e}", flush=True)


def set_constant(spec: str) -> None:
    """``attention.cuda_source.MMA_MIN_GROUP=99``: that slabserve module's global,
    as an int (a probe of a tuning constant without editing the product)."""
    import importlib

    target, _, value = spec.partition("=")
    module, _, name = target.rpartition(".")
    mod = importlib.import_module(f"slabserve.{module}")
    if not hasattr(mod, name):
        raise SystemExit(f"--set: slabserve.{module} has no {name}")
    setattr(mod, name, int(value))
    print(f"set slabserve.{target} = {int(value)}", flush=True)


def set_plan(spec: str) -> None:
    """``fused_max_chunks=64``: that field of the native CUDA kernel's default chunk plan
    (attention/cuda_plan.PlanParams), as an int, for every NativeCUDA built afterwards."""
    from dataclasses import replace

    from slabserve.attention.native_cuda import NativeCUDA

    field, _, value = spec.partition("=")
    params, *rest = NativeCUDA.__init__.__defaults__
    if not hasattr(params, field):
        raise SystemExit(f"--plan: PlanParams has no {field}")
    NativeCUDA.__init__.__defaults__ = (replace(params, **{field: int(value)}), *rest)
    print(f"plan {field} = {int(value)}", flush=True)


def bias_as_add() -> None:
    """engine/fused.py's plain biased projections as ``x @ w_t + bias`` (MLX's gemv for few
    rows, then an add) instead of ``mx.addmm`` (cuBLASLt with a bias epilogue on CUDA)."""
    from slabserve.engine import fused

    shipped = fused.Projection.__call__

    def call(self, x):
        a = self.arrays
        if self.quantized or "bias" not in a or (
                self.rows is not None and self.rows.applies(x, a["weight"])):
            return shipped(self, x)
        return x @ a["weight_t"] + a["bias"]

    fused.Projection.__call__ = call
    print("fused biased projections: matmul + add", flush=True)


def main() -> None:
    from slabserve.cli import prepare_mlx_env

    prepare_mlx_env()  # as `slabserve serve` does, before MLX is imported
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16")
    ap.add_argument("--kv-budget", default="2G", help="'device': serve's own sizing")
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests in flight at once in the serving loop")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-direct", action="store_true")
    ap.add_argument("--pin-engine", type=int, default=None, metavar="CPU",
                    help="the engine thread alone on this core (the spread between processes)")
    ap.add_argument("--variants", default="|".join(VARIANTS),
                    help="serve flags per variant, '|'-separated ('' = the defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a slabserve module's constant before the engine is built, "
                    "e.g. attention.cuda_source.MMA_MIN_GROUP=99 (repeatable)")
    ap.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the native CUDA kernel's default PlanParams (set_plan)")
    ap.add_argument("--bias-as-add", action="store_true",
                    help="fused projections with a bias (Qwen2's q/k/v) as a matmul and an "
                    "add instead of mx.addmm (experiments/bias_matmul.py)")
    args = ap.parse_args()
    for spec in args.set:
        set_constant(spec)
    for spec in args.plan:
        set_plan(spec)
    if args.bias_as_add:
        bias_as_add()
    name, _, dtype = args.embedded.partition(":")
    base = ["--model", f"embedded:{name}", "--dtype", dtype or "bfloat16"]
    if args.kv_budget != "device":  # device: the pool sized from the device (serve's default)
        base += ["--kv-budget", args.kv_budget]
    print(f"MLX_MAX_MB_PER_BUFFER={os.environ.get('MLX_MAX_MB_PER_BUFFER')} "
          f"MLX_MAX_OPS_PER_BUFFER={os.environ.get('MLX_MAX_OPS_PER_BUFFER')}", flush=True)
    for v in args.variants.split("|"):
        print(f"== {v or 'defaults'}", flush=True)
        asyncio.run(one_variant(base + shlex.split(v), args))
        gc.collect()


if __name__ == "__main__":
    main()

"""Engine step overhead and inter-token latency under chunked prefill.

``python -m slabserve.bench.step_overhead`` (or ``slabserve bench step-overhead``):

1. **Overhead**: B streams decode together (B = 1, 8, 32); for steady decode steps
   (exactly B decodes, no prefill) the engine's own step log splits each step into
   planning, model forward (inside ``ModelRunner.forward``), sampling + glue, update +
   detokenize + stop strings, and handing deltas to the event loop.  Overhead = the share
   of the step outside the forward.  Greedy and sampled (temperature + top_p) rows.
2. **ITL** (``--itl``): S streams decode while one long prompt is admitted; the gaps
   between the streams' tokens (seen by the asyncio consumer) before and during that
   prompt's prefill, for several ``prefill_chunk`` values, all on one loaded model.
3. **GIL** (``--gil``): does a thread waiting on MLX work let the event loop run?
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time

from slabserve.engine.build import EngineConfig, assemble, model_name
from slabserve.engine.config import CacheConfig
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig

GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_p=0.95)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(vocab) for _ in range(length)) for _ in range(n)]


async def _drain(eng, req: Request, stamps: list[float] | None = None) -> int:
    n = 0
    async for d in eng.generate(req):
        if d.finish_reason == "error":
            raise RuntimeError(f"{req.request_id}: {d.error}")
        n += len(d.token_ids)
        if stamps is not None and d.token_ids:
            stamps.append(time.perf_counter())
    return n


async def _tick(lag: list[float], period: float = 0.001) -> None:
    """Longest extra delay of a 1 ms sleep on the event loop (is the loop responsive?)."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        lag[0] = max(lag[0], time.perf_counter() - t - period)


async def overhead_row(eng, batch: int, steps: int, warmup: int, kind: str, vocab: int):
    params = SamplingParams(max_tokens=steps + warmup + 2, ignore_eos=True, seed=1,
                            **(GREEDY if kind == "greedy" else SAMPLED))
    eng.step_log.clear()
    ps = _prompts(batch, 16, vocab, seed=batch)
    lag = [0.0]
    ticker = asyncio.create_task(_tick(lag))
    await asyncio.gather(*[_drain(eng, Request(f"{kind}{batch}-{i}", p, params))
                           for i, p in enumerate(ps)])
    ticker.cancel()
    recs = [r for r in eng.step_log if r.decodes == batch and r.prefill_tokens == 0]
    recs = recs[warmup:][:steps]
    tot = sum(r.total_s for r in recs)
    fwd = sum(r.forward_s for r in recs)
    part = {k: 1e3 * sum(getattr(r, k) for r in recs) / len(recs)
            for k in ("schedule_s", "sample_s", "update_s", "deliver_s")}
    return dict(batch=batch, kind=kind, steps=len(recs), step_ms=1e3 * tot / len(recs),
                loop_lag_ms=1e3 * lag[0],
                forward_ms=1e3 * fwd / len(recs), overhead=(tot - fwd) / tot, **part)


async def itl_row(runner, tok, name, chunk: int, streams: int, prompt_len: int, vocab: int):
    cfg = SchedulerConfig(max_step_tokens=chunk + streams, prefill_chunk=chunk)
    eng = assemble(runner, tok, cfg, name)
    await eng.start()
    try:
        params = SamplingParams(max_tokens=eng.max_context - 16, temperature=0.0,
                                ignore_eos=True)
        stamps: list[list[float]] = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(_drain(eng, Request(f"s{i}", p, params), stamps[i]))
                 for i, p in enumerate(_prompts(streams, 16, vocab, seed=7))]
        while min(len(s) for s in stamps) < 8:
            await asyncio.sleep(0.005)
            for t in tasks:
                if t.done():
                    t.result()  # raise what ended a stream early
        t_sub = time.perf_counter()
        long_stamps: list[float] = []
        long = Request("long", _prompts(1, prompt_len, vocab, seed=8)[0],
                       SamplingParams(max_tokens=1, temperature=0.0))
        await _drain(eng, long, long_stamps)
        t_first = long_stamps[0]
        await asyncio.sleep(0.0)
        for i in range(streams):
            eng.abort(f"s{i}")
        await asyncio.gather(*tasks)
    finally:
        await eng.shutdown(10)
    before, during = [], []
    for s in stamps:  # "during": gaps that overlap [submit, first token of the long prompt]
        for a, b in zip(s, s[1:], strict=False):
            (before if b <= t_sub else during if a < t_first else []).append(b - a)
    before = before[-20:]
    return dict(chunk=chunk, ttft_s=t_first - t_sub,
                before_ms=1e3 * statistics.median(before),
                during_p50_ms=1e3 * statistics.median(during) if during else float("nan"),
                during_max_ms=1e3 * max(during) if during else float("nan"),
                tokens_during=len(during))


def gil_probe(n: int = 1536, chain: int = 6, reps: int = 3) -> list[tuple[str, float, float]]:
    """Longest pause of a 1 ms ticker on the main thread while a worker thread evaluates a
    matmul chain: with ``mx.eval``, and with ``mx.async_eval`` then waiting on it."""
    import threading

    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a)

    def work(mode: str) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        for _ in range(reps):
            b = a
            for _ in range(chain):
                b = b @ a
            if mode == "eval":
                mx.eval(b)
            else:
                mx.async_eval(b)
                mx.eval(b)

    rows = []
    for mode in ("eval", "async_eval+eval"):
        t = threading.Thread(target=work, args=(mode,))
        t0 = time.perf_counter()
        t.start()
        last, gap = time.perf_counter(), 0.0
        while t.is_alive():
            time.sleep(0.001)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
        rows.append((mode, time.perf_counter() - t0, gap))
    return rows


def add_runner_args(ap: argparse.ArgumentParser, dtype: str = "bfloat16", kv_gib: int = 8) -> None:
    """``--model``, ``--dtype`` and ``--kv-gib``: what ``load_runner`` reads."""
    ap.add_argument("--model", default="embedded:qwen2.5-0.5b")
    ap.add_argument("--dtype", default=dtype)
    ap.add_argument("--kv-gib", type=int, default=kv_gib)


def load_runner(args):
    """(ModelRunner, tokenizer, served name) for ``args.model`` / ``--dtype`` / ``--kv-gib``
    (benchmarks that drive the engine in-process share it)."""
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner

    from slabserve.mlxmem import configure_memory

    configure_memory(None)
    model, tok, _ = load(args.model, args.dtype)
    cache = CacheConfig(block_size=16, kv_budget_bytes=args.kv_gib << 30)
    runner = ModelRunner(model, cache)
    return runner, tok, model_name(EngineConfig(model=args.model, dtype=args.dtype))


def allocate_tokens(runner, n: int) -> list[int]:
    """Blocks for ``n`` tokens from ``runner``'s allocator (benchmarks that lay out their
    own sequences); SystemExit when the KV budget cannot hold them."""
    got = runner.allocator.allocate(-(-n // runner.block_size))
    if got is None:
        raise SystemExit("KV budget too small: raise --kv-gib")
    return got


@contextlib.contextmanager
def eval_replaced(fn):
    """Within the block, ``mx.eval`` calls ``fn`` (which gets the real ``mx.eval`` first,
    then eval's arguments): how benchmarks stop or split ``ModelRunner.forward`` at its
    evaluation."""
    import mlx.core as mx

    real = mx.eval
    mx.eval = lambda *args: fn(real, *args)
    try:
        yield
    finally:
        mx.eval = real


async def _main(args) -> None:
    if args.gil:
        print("| worker waits with | worker total s | longest main-thread pause ms |")
        print("|---|--:|--:|")
        for mode, total, gap in gil_probe():
            print(f"| {mode} | {total:.2f} | {1e3 * gap:.1f} |")
        return
    runner, tok, name = load_runner(args)
    vocab = min(len(tok), 30_000)
    print(f"model {name} {args.dtype}, {runner.geom.num_layers} layers")
    if not args.skip_overhead:
        eng = assemble(runner, tok, SchedulerConfig(max_step_tokens=4096, prefill_chunk=512),
                       name)
        await eng.start()
        print("| batch | sampling | steps | step ms | forward ms | schedule ms | "
              "sample+glue ms | update+detok ms | deliver ms | outside forward | "
              "loop lag max ms |")
        print("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        try:
            for kind in args.kinds.split(","):
                for b in [int(x) for x in args.batches.split(",")]:
                    r = await overhead_row(eng, b, args.steps, args.warmup, kind, vocab)
                    print(f"| {b} | {kind} | {r['steps']} | {r['step_ms']:.1f} | "
                          f"{r['forward_ms']:.1f} | {r['schedule_s']:.2f} | "
                          f"{r['sample_s']:.2f} | {r['update_s']:.2f} | "
                          f"{r['deliver_s']:.2f} | {100 * r['overhead']:.1f}% | "
                          f"{r['loop_lag_ms']:.1f} |", flush=True)
        finally:
            await eng.shutdown(10)
    if args.itl:
        print(f"\nITL of {args.streams} running streams while a {args.prompt_len}-token "
              "prompt is admitted")
        print("| prefill_chunk | ITL before ms (p50) | ITL during p50 ms | ITL during max ms "
              "| stream tokens during | long prompt TTFT s |")
        print("|--:|--:|--:|--:|--:|--:|")
        await itl_row(runner, tok, name, args.prompt_len, 1, args.prompt_len, vocab)  # warm-up
        for c in [int(x) for x in args.chunks.split(",")]:
            r = await itl_row(runner, tok, name, c, args.streams, args.prompt_len, vocab)
            print(f"| {c} | {r['before_ms']:.1f} | {r['during_p50_ms']:.1f} | "
                  f"{r['during_max_ms']:.1f} | {r['tokens_during']} | {r['ttft_s']:.2f} |",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench step-overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_args(ap, dtype="float32", kv_gib=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--kinds", default="greedy,sampled")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--itl", action="store_true")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--chunks", default="1024,256,64")
    ap.add_argument("--gil", action="store_true",
                    help="only probe whether waiting on MLX work releases the GIL")
    asyncio.run(_main(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

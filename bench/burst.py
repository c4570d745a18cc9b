"""Where a burst of concurrent requests spends the engine's steps.

``python -m slabserve.bench.burst --model embedded:qwen2.5-0.5b --dtype bfloat16 --requests 8
--prompt 1000 --max-tokens 32 --rounds 2``

The in-process engine (scheduler + executor + runner, no HTTP) gets ``--requests`` prompts
of ``--prompt`` random tokens at once, ``--rounds`` times with fresh prompts (round 1 pays
first-use costs such as kernel compiles and graph builds; later rounds show the steady
state).  Per round: time to first token (median, max), steps, and the engine's step log
split into steps that carry prefill tokens and decode-only steps (model forward and
sampling medians, max).  The first steps of the last round are listed.  Diagnoses slow
TTFT / TPOT under load (load tests show the symptom, this shows the step that causes it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from slabserve.build import ServeConfig, assemble, model_name
from slabserve.engine.config import CacheConfig
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.steplog import PHASES


def add_runner_args(ap: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--kv-gib``: what ``load_runner`` reads."""
    ap.add_argument("--model", default="embedded:qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-gib", type=int, default=8)


def load_runner(args):
    """(ModelRunner, tokenizer, served name) for ``args.model`` / ``--dtype`` / ``--kv-gib``."""
    from slabserve import env
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner
    from slabserve.mlxmem import configure_memory

    configure_memory(None)
    model, tok, _ = load(args.model, args.dtype, cache_dir=env.cache_dir())
    runner = ModelRunner(model, CacheConfig(block_size=16, kv_budget_bytes=args.kv_gib << 30))
    return runner, tok, model_name(ServeConfig(model=args.model, dtype=args.dtype))


async def burst(eng, n: int, prompt: int, max_tokens: int, vocab: int, seed: int) -> dict:
    """``n`` prompts of ``prompt`` random tokens at once through the engine: TTFT, wall time
    and the step log split into prefill and decode-only steps (``records``: the log)."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        req = Request(f"r{seed}-{i}", tuple(rng.randrange(vocab) for _ in range(prompt)), params)
        async for d in eng.generate(req):
            if d.finish_reason == "error":
                raise RuntimeError(d.error)
            if d.token_ids and req.request_id not in first:
                first[req.request_id] = time.perf_counter() - t0

    eng.step_log.clear()
    await asyncio.gather(*[one(i) for i in range(n)])
    wall = time.perf_counter() - t0
    recs = list(eng.step_log)
    pre = [r for r in recs if r.prefill_tokens]
    dec = [r for r in recs if not r.prefill_tokens]

    def med(rs, k):
        return 1e3 * statistics.median(getattr(r, k) for r in rs) if rs else float("nan")

    out = dict(wall_s=wall, ttft_p50_ms=1e3 * statistics.median(first.values()),
               ttft_max_ms=1e3 * max(first.values()), steps=len(recs),
               prefill_steps=len(pre), prefill_fwd_p50_ms=med(pre, "forward_s"),
               prefill_fwd_max_ms=1e3 * max((r.forward_s for r in pre), default=0.0),
               prefill_sample_p50_ms=med(pre, "sample_s"),
               decode_steps=len(dec), decode_total_p50_ms=med(dec, "total_s"))
    for phase in (*PHASES, "host_cpu"):
        out[f"decode_{phase}_p50_ms"] = med(dec, f"{phase}_s")
    return out | {"records": recs}


async def _main(args) -> None:
    runner, tok, name = load_runner(args)
    import mlx.core as mx

    cfg = SchedulerConfig.for_device(mx.default_device().type == mx.gpu,
                                     max_step_tokens=args.max_step_tokens,
                                     prefill_chunk=args.prefill_chunk,
                                     prefill_align=args.prefill_align)
    print(f"scheduler: max_step_tokens {cfg.max_step_tokens}, prefill_chunk "
          f"{cfg.prefill_chunk}, prefill_align {cfg.prefill_align}")
    eng = assemble(runner, tok, cfg, name)
    await eng.start()
    vocab = min(len(tok), 30_000)
    try:
        for rnd in range(args.rounds):
            r = await burst(eng, args.requests, args.prompt, args.max_tokens, vocab, seed=rnd)
            recs = r.pop("records")
            print(f"round {rnd}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                flush=True)
        print(f"last round, first steps: decodes prefill_tokens {'/'.join(PHASES)} "
              "host_cpu ms")
        for x in recs[: args.show]:
            ms = " ".join(f"{1e3 * t:7.2f}" for t in (*x.phases, x.host_cpu_s))
            print(f"  {x.decodes:3d} {x.prefill_tokens:5d}  {ms}")
    finally:
        await eng.shutdown(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench burst", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_args(ap)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-step-tokens", type=int, default=None, help="default: per device")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default: per device")
    ap.add_argument("--prefill-align", type=int, default=None, help="default: per device")
    ap.add_argument("--show", type=int, default=24)
    asyncio.run(_main(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

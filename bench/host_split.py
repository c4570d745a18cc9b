"""Where a forward's time goes: building the graph on the host vs evaluating it.

``python -m slabserve.bench.host_split --model embedded:qwen2.5-0.5b --dtype bfloat16 --decodes 8``

``ModelRunner.forward`` builds the step's lazy graph in Python and then calls ``mx.eval``.
This times the two halves separately (``mx.eval`` is intercepted, so the build ends where
the runner would evaluate) for batched decodes at several context lengths and for prefill
forwards of 1, 2, 4 and 8 equally long chunks (rows, ADR 0007), so one run tells

- whether a decode step's growth with context is host work (tables, plans) or device work;
- how a prefill forward's cost grows with its rows: what a larger GPU step budget
  (``--max-step-tokens``, more chunks per step) buys.

The pool is not filled by real prefills (timing only; K/V are whatever the pool holds), so
any context fits quickly.  ``--profile`` prints the top host functions (cProfile) of one
decode build at the longest context.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time

from slabserve.bench.step_overhead import (
    add_runner_args,
    allocate_tokens,
    eval_replaced,
    load_runner,
)
from slabserve.engine.runner import SeqInput


def timed_forward(runner, pre, dec) -> tuple[float, float]:
    """(build s, eval s) of one ``runner.forward(pre, dec)``."""
    marks = {}

    def split_eval(real, *args):
        marks["built"] = time.perf_counter()
        real(*args)

    with eval_replaced(split_eval):
        t0 = time.perf_counter()
        runner.forward(pre, dec)
        t1 = time.perf_counter()
    return marks["built"] - t0, t1 - marks["built"]


def median_split(runner, make, reps: int) -> tuple[float, float]:
    """Median (build ms, eval ms) over ``reps`` forwards after one warm-up; ``make(i)``
    gives (prefills, decodes) of repetition ``i``."""
    timed_forward(runner, *make(0))
    runs = [timed_forward(runner, *make(i)) for i in range(1, reps + 1)]
    return (1e3 * statistics.median(r[0] for r in runs),
            1e3 * statistics.median(r[1] for r in runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.bench.host_split")
    add_runner_args(ap)
    ap.add_argument("--decodes", type=int, default=8)
    ap.add_argument("--ctxs", default="16,4000,16000")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dispatch-every", default="0",
                    help="ModelRunner.dispatch_every values to compare (e.g. 0,6,12)")
    ap.add_argument("--skip-writes", action="store_true",
                    help="also time decodes with the pool's K/V writes left out (an upper "
                    "bound on what a cheaper write path can save; attention reads stale K/V)")
    a = ap.parse_args(argv)
    runner, tok, name = load_runner(a)
    if a.skip_writes:
        real_write = runner.pool.write
        runner.pool.write = lambda *args: None
        print("### K/V writes skipped")
        _table(runner, tok, name, argparse.Namespace(**{**vars(a), "rows": ""}))
        runner.pool.write = real_write
    for every in (int(x) for x in a.dispatch_every.split(",")):
        runner.dispatch_every = every
        if every:
            print(f"\n### dispatch_every = {every} (async_eval every {every} layers)")
        _table(runner, tok, name, a)
    if a.profile:
        _profile(runner, a)
    return 0


def _table(runner, tok, name, a) -> None:
    rng = random.Random(0)
    vocab = min(len(tok), 30_000)
    ctxs = [int(x) for x in a.ctxs.split(",")]
    rows = [int(x) for x in a.rows.split(",") if x.strip()]
    tokens = max(ctxs + [a.chunk]) + a.reps + 2
    tables = [allocate_tokens(runner, tokens) for _ in range(max([a.decodes, *rows]))]
    print(f"model {name} {a.dtype}, {runner.geom.num_layers} layers; median of {a.reps}")
    print("| forward | build ms | eval ms | total ms |")
    print("|---|--:|--:|--:|")
    for ctx in ctxs:
        def make(i, ctx=ctx):
            return [], [SeqInput([rng.randrange(vocab)], ctx + i, t)
                        for t in tables[: a.decodes]]
        b, e = median_split(runner, make, a.reps)
        print(f"| decode x{a.decodes} at {ctx} | {b:.1f} | {e:.1f} | {b + e:.1f} |", flush=True)
    toks = [rng.randrange(vocab) for _ in range(a.chunk)]
    for r in rows:
        def make(i, r=r):
            return [SeqInput(toks, 0, t, want_logits=True) for t in tables[:r]], []
        b, e = median_split(runner, make, a.reps)
        print(f"| {r} x {a.chunk}-token chunk (rows), prefix 0 | {b:.1f} | {e:.1f} | "
              f"{b + e:.1f} |", flush=True)
    runner.allocator.free([b for t in tables for b in t])


def _profile(runner, a) -> None:
    """Top host functions of one decode build at the longest context."""
    ctx = max(int(x) for x in a.ctxs.split(","))
    dec = [SeqInput([1], ctx, allocate_tokens(runner, ctx + 1)) for _ in range(a.decodes)]
    prof = cProfile.Profile()
    with eval_replaced(lambda _real, *args: None):
        prof.runcall(runner.forward, [], dec)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a decode step's host time goes on the lent GPU: the graph's node count by
primitive (``mx.export_to_dot`` of one step) and a cProfile of the build, compiled stages,
one batch / context cell: ``python -m experiments.step_profile --embedded
llama-3.2-1b:bfloat16 --batch 1 --ctx 1024``."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx


def main() -> None:
    from slabserve.bench.decode_phases import one_step
    from slabserve.bench.decode_step import BenchConfig, fast_fill, load_runner, parse_model
    from slabserve.engine.config import RunnerConfig
    from slabserve.scheduler.api import SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    name, dtype = parse_model(a.embedded)
    cfg = BenchConfig(name, dtype, (a.batch,), (a.ctx,), ("auto",), a.steps, 3, 8 << 30, 16,
                      65536, 0)
    runner, executor, _ = load_runner(cfg, RunnerConfig(compile_decode=not a.eager))
    tables = fast_fill(runner, a.batch, a.ctx, 0)
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    toks = [1] * a.batch
    for r in range(5):
        _, toks = one_step(runner, executor, tables, toks, a.ctx + r, r, params)
    seqs = executor_inputs(runner, tables, toks, a.ctx + 5)
    logits = runner._decode(seqs)  # the graph, not yet handed to the device
    dot = Path(tempfile.mkdtemp()) / "step.dot"
    mx.export_to_dot(str(dot), logits, *runner.pool.take_pending())
    ops = Counter(re.findall(r'label ="([A-Za-z]+)', dot.read_text()))
    mx.eval(logits)
    print(f"nodes {sum(ops.values())}: {ops.most_common(25)}")
    prof = cProfile.Profile()
    for r in range(a.steps):
        prof.enable()
        _, toks = one_step(runner, executor, tables, toks, a.ctx + 6 + r, 6 + r, params)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def executor_inputs(runner, tables, toks, pos):
    from slabserve.engine.runner import SeqInput
    return [SeqInput([t], pos, tb) for t, tb in zip(toks, tables, strict=True)]


if __name__ == "__main__":
    main()

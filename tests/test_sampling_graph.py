"""The compiled sampler (engine/sampling_graph.py): bitwise the eager sampler's tokens and
logprobs, one compiled function per feature set, and the executor's use of it where
decode forwards are compiled."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load
from models import make
from sched_fakes import drive
from test_runner import prompts

from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.executor import ModelExecutor
from slabserve.engine.runner import ModelRunner
from slabserve.engine.sampling import RowSpec, draw
from slabserve.engine.sampling_graph import CompiledSampler
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.scheduler import Scheduler

V = 300


def logits(rows: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, 3, size=(rows, V)).astype(np.float32))


def both(x: mx.array, specs, sampler: CompiledSampler, allowed=None):
    return draw(x, specs, allowed).host(), draw(x, specs, allowed, sampler).host()


MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9, logprobs=2),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=1.0, min_p=0.05, logprobs=0),
    SamplingParams(temperature=0.9, top_p=0.5, top_k=50, min_p=0.01,
                   repetition_penalty=1.3, logit_bias=((5, 4.0),)),
]


def test_mixed_batch_is_bitwise_the_eager_sampler():
    """Greedy and random rows, every filter, logprobs, processors and a grammar mask over
    several steps (each row's key moves with its token index): the same tokens and the
    same logprobs; 5 rows run padded to 8 through one compiled function."""
    sampler = CompiledSampler()
    allowed = np.ones((len(MIXED), V), dtype=bool)
    allowed[2, ::2] = False  # a constrained row
    for step in range(4):
        specs = [RowSpec(p, 40 + i, (1, 2, 3), tuple(range(step)), step)
                 for i, p in enumerate(MIXED)]
        eager, compiled = both(logits(len(MIXED), step), specs, sampler, mx.array(allowed))
        assert compiled == eager
        assert compiled[2][0] % 2 == 1  # the mask holds
        assert compiled[1][1] is not None and len(compiled[1][1].top) == 2
    assert sampler.feature_sets == 1


def test_batches_share_one_function_across_buckets_and_greedy_ones_stay_eager():
    sampler = CompiledSampler()
    p = SamplingParams(temperature=0.6, min_p=0.1)
    for rows in (3, 4, 1, 6):
        x = logits(rows, rows)
        specs = [RowSpec(p, i, (), (), rows) for i in range(rows)]
        assert draw(x, specs, None, sampler).host() == draw(x, specs).host()
    assert sampler.feature_sets == 1
    x = logits(3, 0)
    specs = [RowSpec(SamplingParams(temperature=0.0), 0, (), ()) for _ in range(3)]
    got = [t for t, _ in draw(x, specs, None, sampler).host()]
    assert got == np.array(x).argmax(-1).tolist() and sampler.feature_sets == 1


def test_seeded_row_is_the_same_alone_and_in_a_batch():
    sampler = CompiledSampler()
    p = SamplingParams(temperature=0.8, top_k=40)
    x = logits(3, 7)
    row = RowSpec(p, 1234, (), (), 5)
    alone = draw(x[1:2], [row], None, sampler).host()[0]
    batch = [RowSpec(p, 9, (), (), 5), row, RowSpec(SamplingParams(temperature=0.0), 1, (), ())]
    assert draw(x, batch, None, sampler).host()[1] == alone


def test_executor_samples_through_the_compiled_sampler(model_root):
    """Seeded random requests through the scheduler: compiled decode (which samples with
    the compiled sampler) gives the tokens of the eager runner and sampler."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    ps = prompts(3, seed=5)
    runs = {}
    for compiled in (False, True):
        runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                                kv_budget_bytes=1 << 24),
                             RunnerConfig(compile_decode=compiled, linear_layout=False))
        executor = ModelExecutor(runner, 1024)
        sched = Scheduler(SchedulerConfig(), runner.allocator, runner.block_size, 1024)
        for i, p in enumerate(ps):
            sched.add(Request(f"r{i}", tuple(p), SamplingParams(
                max_tokens=6, temperature=0.9, top_p=0.8, seed=i, ignore_eos=True)))
        runs[compiled] = drive(sched, executor)[0]
        assert executor.sampler.feature_sets == int(compiled)
        assert runner.allocator.num_used == 0
    assert runs[True] == runs[False]
    assert any(len(set(t)) > 1 for t in runs[True].values())

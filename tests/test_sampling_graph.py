"""The compiled sampler (engine/sampling_graph.py): bitwise the eager sampler's tokens and
logprobs (logits processors and grammar masks included), one compiled function per
feature set, traces bounded as histories grow, and the executor's use of it where decode
forwards are compiled."""

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
from slabserve.engine.sampling import COMPILED_MIN_ROWS, RowSpec, draw
from slabserve.engine.sampling_graph import CompiledSampler, entry_bucket
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.scheduler import Scheduler

V = 300


def logits(rows: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, 3, size=(rows, V)).astype(np.float32))


def both(x: mx.array, specs, sampler: CompiledSampler, allowed=None):
    return draw(x, specs, allowed).host(), draw(x, specs, allowed, sampler, 1).host()


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
        assert draw(x, specs, None, sampler, 1).host() == draw(x, specs).host()
    assert sampler.feature_sets == 1
    x = logits(3, 0)
    specs = [RowSpec(SamplingParams(temperature=0.0), 0, (), ()) for _ in range(3)]
    got = [t for t, _ in draw(x, specs, None, sampler, 1).host()]
    assert got == np.array(x).argmax(-1).tolist() and sampler.feature_sets == 1


def test_one_row_samples_eagerly_by_default():
    """Below ``COMPILED_MIN_ROWS`` (one row: faster eagerly on the GPU) ``draw`` does not
    call the compiled sampler; from it on it does; the tokens are the same either way."""
    sampler = CompiledSampler()
    p = SamplingParams(temperature=0.7, repetition_penalty=1.2)
    for rows in (1, COMPILED_MIN_ROWS):
        x = logits(rows, 9)
        specs = [RowSpec(p, i, (1, 2), (3,), 1) for i in range(rows)]
        before = sampler.calls
        assert draw(x, specs, None, sampler).host() == draw(x, specs).host()
        assert sampler.calls - before == (rows >= COMPILED_MIN_ROWS)


def test_seeded_row_is_the_same_alone_and_in_a_batch():
    sampler = CompiledSampler()
    p = SamplingParams(temperature=0.8, top_k=40)
    x = logits(3, 7)
    row = RowSpec(p, 1234, (), (), 5)
    alone = draw(x[1:2], [row], None, sampler, 1).host()[0]
    batch = [RowSpec(p, 9, (), (), 5), row, RowSpec(SamplingParams(temperature=0.0), 1, (), ())]
    assert draw(x, batch, None, sampler, 1).host()[1] == alone


PV = 1000  # vocabulary of the processor tests
PROCESSED = [  # (params, prompt length, output length, output drawn from [0, n) or None)
    (SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.6,
                    logprobs=3,
                    logit_bias=((3, 1.0), (3, 2.5), (PV + 5, 9.0), (-1, 9.0), (11, -2.0))),
     140, 6, None),
    (SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=0.8,
                    presence_penalty=0.5, frequency_penalty=0.4), 90, 10, 12),
    (SamplingParams(temperature=1.1, top_k=50, presence_penalty=0.7,
                    frequency_penalty=1.5, logit_bias=((7, 100.0),)), 30, 0, None),
    (SamplingParams(temperature=0.0), 10, 4, None),
    (SamplingParams(temperature=0.7, min_p=0.05, presence_penalty=2.0, frequency_penalty=0.3,
                    logprobs=0, logit_bias=((20, 3.0),)), 5, 8, 6),
]


def _rows(rng, vocab: int = PV):
    """Each PROCESSED row's params, prompt and output (outputs drawn from a few tokens
    repeat, so frequency counts pass 1; outputs start with token 0, so real entries meet
    the pad entries' position (0, 0))."""
    rows = []
    for p, n_prompt, n_out, few in PROCESSED:
        prompt = rng.integers(0, vocab, n_prompt).tolist()
        output = [0, *rng.integers(0, few or vocab, max(n_out - 1, 0)).tolist()][:n_out]
        rows.append((p, prompt, output))
    return rows


def same_bits(a, b) -> bool:
    xs, ys = a.arrays(), b.arrays()
    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and np.array(x).tobytes() == np.array(y).tobytes()
        for x, y in zip(xs, ys, strict=True))


def test_processors_are_bitwise_the_eager_sampler():
    """Bias (duplicates, out-of-range tokens), repetition (> 1 and < 1), presence and
    frequency (repeated and empty outputs) on greedy and random rows, with a grammar mask
    and reported logprobs, batches of 5 and 3 (padded to 8 and 4): tokens and logprobs
    bitwise the eager sampler's at every step, as each row's output grows by its token
    and the repetition entries cross a bucket (246 to 262)."""
    sampler = CompiledSampler()
    rng = np.random.default_rng(3)
    rows = _rows(rng)
    allowed = np.ones((len(rows), PV), dtype=bool)
    allowed[2, 7] = allowed[2, ::3] = False  # biased +100 and masked: never drawn
    reps = [sum(len(pr) + len(out) for p, pr, out in rows if p.repetition_penalty != 1)]
    for step in range(8):
        x = mx.array(rng.normal(0, 3, size=(len(rows), PV)).astype(np.float32))
        specs = [RowSpec(p, 60 + i, tuple(pr), tuple(out), step)
                 for i, (p, pr, out) in enumerate(rows)]
        for b in (3, 5):  # the last: the whole batch
            mask = mx.array(allowed[:b])
            eager, comp = draw(x[:b], specs[:b], mask), draw(x[:b], specs[:b], mask, sampler, 1)
            assert same_bits(eager, comp), (step, b)
        picked = comp.host()
        assert picked[2][0] % 3 != 0 and picked[2][0] != 7
        assert picked[0][1] is not None and len(picked[0][1].top) == 3
        for (_, _, out), (tok, _) in zip(rows, picked, strict=True):
            out.append(tok)
        reps.append(reps[-1] + 2)
    assert entry_bucket(reps[0]) < entry_bucket(reps[-1])
    assert sampler.feature_sets == 2  # the 3 rows use no min_p


def test_processors_move_the_greedy_choice():
    """A bias large enough to win, and a repetition penalty on the best token, change an
    argmax row's token: the processors run (compiled and eager alike)."""
    x = logits(2, 11)
    best = np.array(x).argmax(-1).tolist()
    specs = [RowSpec(SamplingParams(temperature=0.0, logit_bias=((17, 1e4),)), 0, (), ()),
             RowSpec(SamplingParams(temperature=0.0, repetition_penalty=1e4), 0,
                     (best[1],), ())]
    sampler = CompiledSampler()
    got = [t for t, _ in draw(x, specs, None, sampler, 1).host()]
    assert got[0] == 17 and got[1] != best[1]
    assert got == [t for t, _ in draw(x, specs).host()] and sampler.feature_sets == 1


def test_traces_stay_bounded_as_histories_grow():
    """One token more per step: the entry arrays keep their bucket, so the graph is traced
    once per combination of buckets met, not per step (an all-greedy batch with
    processors runs compiled)."""
    sampler = CompiledSampler()
    rng = np.random.default_rng(5)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.4,
                       frequency_penalty=0.2)
    prompt, output = tuple(rng.integers(0, V, 99).tolist()), [1]
    buckets = set()
    for step in range(30):  # repetition entries 100..129, presence/frequency 1..30
        x = logits(2, step)
        specs = [RowSpec(p, 0, prompt, tuple(output), step),
                 RowSpec(SamplingParams(temperature=0.0), 0, (), ())]
        assert same_bits(draw(x, specs), draw(x, specs, None, sampler, 1))
        buckets.add((entry_bucket(len(prompt) + len(output)), entry_bucket(len(output))))
        output.append(int(rng.integers(0, 8)))
    assert sampler.feature_sets == 1
    assert sampler.traces == len(buckets) == 3


def _engine(model, compiled: bool):
    """(runner, executor, scheduler) over a small pool, decode compiled or eager."""
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                            kv_budget_bytes=1 << 24),
                         RunnerConfig(compile_decode=compiled, linear_layout=False))
    sched = Scheduler(SchedulerConfig(), runner.allocator, runner.block_size, 1024)
    return runner, ModelExecutor(runner, 1024), sched


def test_executor_samples_through_the_compiled_sampler(model_root):
    """Seeded random requests through the scheduler, one with a repetition penalty:
    compiled decode (which samples with the compiled sampler, the prompt as the
    executor's cached array) gives the tokens of the eager runner and sampler; the
    cached prompt goes with the request."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    ps = prompts(3, seed=5)
    runs = {}
    for compiled in (False, True):
        runner, executor, sched = _engine(model, compiled)
        for i, p in enumerate(ps):
            sched.add(Request(f"r{i}", tuple(p), SamplingParams(
                max_tokens=6, temperature=0.9, top_p=0.8, seed=i, ignore_eos=True,
                repetition_penalty=1.3 if i == 1 else 1.0)))
        runs[compiled] = drive(sched, executor)[0]
        assert executor.sampler.feature_sets == int(compiled)
        assert list(executor._prompts) == (["r1"] if compiled else [])
        executor.release("r1")
        assert not executor._prompts
        assert runner.allocator.num_used == 0
    assert runs[True] == runs[False]
    assert any(len(set(t)) > 1 for t in runs[True].values())


def test_one_penalised_row_samples_eagerly_from_the_cached_prompt(model_root):
    """A lone request with a repetition penalty under compiled decode: each step has one
    row, which samples eagerly, from the executor's cached int32 prompt; its tokens are
    the eager runner's."""
    model = load(str(make(model_root, "llama-gqa")))[0]
    p = prompts(1, seed=8)[0]
    runs = {}
    for compiled in (False, True):
        runner, executor, sched = _engine(model, compiled)
        sched.add(Request("r", tuple(p), SamplingParams(
            max_tokens=6, temperature=0.9, seed=3, ignore_eos=True, repetition_penalty=1.3)))
        runs[compiled] = drive(sched, executor)[0]
        assert executor.sampler.calls == 0
    assert runs[True] == runs[False]

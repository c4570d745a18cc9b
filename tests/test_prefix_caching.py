"""Automatic prefix caching end to end through the scheduler, the paged runner and the
serving loop: token-exact with and without the cache (every architecture the runner's
tests cover), across preemption, n > 1 (one prefill), and cancellation of a sequence that
shares blocks (nothing leaks)."""

from __future__ import annotations

import asyncio
import random

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
from models import CONFIGS, make

from slabserve.build import assemble
from slabserve.engine.config import CacheConfig
from slabserve.engine.runner import ModelRunner
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SCHED = SchedulerConfig(max_step_tokens=96, prefill_chunk=32)


def _cache(caching: bool, budget: int = 1 << 22) -> CacheConfig:
    return CacheConfig(block_size=16, slab_tokens=256, kv_budget_bytes=budget,
                       prefix_caching=caching)


async def _loop(model, tok, caching: bool, sched=SCHED, budget: int = 1 << 22):
    loop = assemble(ModelRunner(model, _cache(caching, budget)), tok, sched, "t")
    await loop.start()
    return loop


async def _run(loop, rid, prompt, params=GREEDY, salt=None):
    out, last = [], None
    async for d in loop.generate(Request(rid, tuple(prompt), params, salt)):
        out += d.token_ids
        last = d
    return out, last.cached_tokens


async def _idle(loop):
    for _ in range(2000):
        if not loop.scheduler.has_work and not loop._live and not loop._inbox:
            await asyncio.sleep(0.02)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("loop did not go idle")


def _prompts():
    rng = random.Random(7)
    system = [rng.randrange(256) for _ in range(70)]
    a = system + [rng.randrange(256) for _ in range(9)]
    b = system + [rng.randrange(256) for _ in range(20)]
    return system, a, b


@pytest.mark.parametrize("arch", list(CONFIGS))
async def test_token_exact_with_and_without_the_cache(arch, model_root):
    model, tok = load(str(make(model_root, arch)))
    system, a, b = _prompts()
    ref = {tuple(p): [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=8)]
           for p in (a, b, a + [5, 6, 7] * 7)}
    loop = await _loop(model, tok, caching=True)
    try:
        first, cached0 = await _run(loop, "a1", a)
        again, cached1 = await _run(loop, "a2", a)  # sent twice
        longer = a + [5, 6, 7] * 7
        ext, cached2 = await _run(loop, "a3", longer)  # extends a cached prompt
        both = await asyncio.gather(_run(loop, "b1", b), _run(loop, "b2", b))  # concurrent
        await _idle(loop)
        assert first == again == ref[tuple(a)] and ext == ref[tuple(longer)]
        assert [o for o, _ in both] == [ref[tuple(b)]] * 2
        assert cached0 == 0 and cached1 == 64 and cached2 == 64
        assert loop.scheduler.prefix.hits > 0
        alloc = loop.scheduler.allocator
        assert alloc.num_used == 0 and alloc.num_cached > 0 and alloc.check_integrity()
        loop.scheduler.check_integrity()
    finally:
        await loop.shutdown(5)
    off = await _loop(model, tok, caching=False)
    try:
        assert (await _run(off, "x", a)) == (ref[tuple(a)], 0)
        assert (await _run(off, "y", a)) == (ref[tuple(a)], 0)
        assert off.scheduler.allocator.num_cached == 0
    finally:
        await off.shutdown(5)


async def test_equal_prompts_share_one_prefill_n_greater_than_one(model_root):
    """n > 1 (equal prompts at once): the later ones wait for the first one's blocks and
    are admitted onto them; every choice still gets mlx-lm's tokens."""
    model, tok = load(str(make(model_root, "llama-gqa")))
    _, a, _ = _prompts()
    ref = [int(t) for t, _ in generate_step(mx.array(a), model, max_tokens=8)]
    loop = await _loop(model, tok, caching=True)
    try:
        outs = await asyncio.gather(*[_run(loop, f"n{i}", a) for i in range(3)])
        await _idle(loop)
        assert [o for o, _ in outs] == [ref] * 3
        assert sorted(c for _, c in outs) == [0, 64, 64]
        s = loop.scheduler
        assert s.prefix.queries == 3 * len(a) and s.prefix.hits == 128
        assert s.allocator.num_used == 0 and s.allocator.check_integrity()
    finally:
        await loop.shutdown(5)


async def test_exact_under_forced_preemption_and_no_leak_after_cancel(model_root):
    """A pool too small for all sequences at once: preempted sequences re-find their
    cached blocks on resume and every output equals mlx-lm's; a cancelled sequence that
    shares blocks gives its references back."""
    model, tok = load(str(make(model_root, "qwen2-bias")))
    system, _, _ = _prompts()
    rng = random.Random(3)
    ps = [system + [rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=40)] for p in ps]
    geom = ModelRunner(model, _cache(True)).geom
    budget = geom.slab_bytes  # 16 blocks: 6 sequences of 6-10 blocks do not fit at once
    sched = SchedulerConfig(max_step_tokens=96, prefill_chunk=32, watermark_blocks=0)
    loop = await _loop(model, tok, caching=True, sched=sched, budget=budget)
    try:
        outs = await asyncio.gather(*[_run(loop, f"p{i}", p, long) for i, p in enumerate(ps)])
        assert [o for o, _ in outs] == ref
        assert loop.scheduler.preemptions > 0, "the test did not preempt"
        shared = loop.generate(Request("c", tuple(ps[0]), long))
        await shared.__anext__()  # admitted onto cached blocks, decoding
        await shared.aclose()  # cancel
        await _idle(loop)
        alloc = loop.scheduler.allocator
        assert alloc.num_used == 0 and alloc.check_integrity()
        loop.scheduler.check_integrity()
    finally:
        await loop.shutdown(5)

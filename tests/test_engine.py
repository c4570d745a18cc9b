"""The engine end to end on the embedded tiny model: batched == solo == mlx-lm greedy,
exact under preemption, cancellation frees everything, seeds reproduce in a batch."""

from __future__ import annotations

import asyncio
import random

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from slabserve.build import ServeConfig, build_serving
from slabserve.engine.config import CacheConfig
from slabserve.scheduler.api import Request, RequestError, SamplingParams
from slabserve.scheduler.config import SchedulerConfig

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234,
                        ignore_eos=True)


def prompts(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(256) for _ in range(rng.randint(2, 60))) for _ in range(count)]


async def started(**kw):
    """A started engine on the small test pool; ``kw``: other ``ServeConfig`` fields."""
    cache = kw.pop("cache", CacheConfig(block_size=16, slab_tokens=256, kv_budget_bytes=1 << 22))
    sched = kw.pop("scheduler", SchedulerConfig(max_step_tokens=96, prefill_chunk=32))
    eng = build_serving(ServeConfig(cache=cache, scheduler=sched, mlx_cache_limit_bytes=1 << 28,
                                    **kw))
    await eng.start()
    return eng


async def collect(eng, rid: str, prompt, params=GREEDY) -> list[int]:
    out: list[int] = []
    async for d in eng.generate(Request(rid, prompt, params)):
        out += d.token_ids
        last = d
    assert last.finish_reason == "length" and last.generated_tokens == len(out)
    return out


async def wait_idle(eng, timeout=20.0):
    for _ in range(int(timeout / 0.01)):
        if not eng.scheduler.has_work and not eng._live and not eng._inbox:
            await asyncio.sleep(0.02)  # let the thread finish its bookkeeping
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine did not go idle")


@pytest.fixture(scope="module")
def solo() -> dict[tuple, list[int]]:
    return {}


async def solo_outputs(ps, params=GREEDY):
    eng = await started()
    try:
        return [await collect(eng, f"solo{i}", p, params) for i, p in enumerate(ps)]
    finally:
        await eng.shutdown(5)


async def test_16_concurrent_greedy_equal_solo_and_mlx_lm():
    ps = prompts(16)
    alone = await solo_outputs(ps)
    eng = await started()
    try:
        model = eng.executor.runner.model
        for p, got in list(zip(ps, alone, strict=True))[:3]:
            ref = [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=10)]
            assert got == ref
        batched = await asyncio.gather(*[collect(eng, f"r{i}", p) for i, p in enumerate(ps)])
        assert batched == alone
        assert eng.steps < 16 * 10, "requests were batched"
        await wait_idle(eng)
        assert eng.stats().kv_blocks_used == 0
    finally:
        await eng.shutdown(5)


async def test_exact_under_preemption_and_seeds_reproduce():
    ps = prompts(16, seed=1)
    alone = await solo_outputs(ps)
    seeded_alone = (await solo_outputs(ps[:1], SEEDED))[0]
    # 8 blocks of 16 tokens: one request fits, sixteen do not
    tiny = CacheConfig(block_size=16, slab_tokens=32, kv_budget_bytes=8 * 16 * 2048)
    eng = await started(cache=tiny)
    try:
        jobs = [collect(eng, f"r{i}", p) for i, p in enumerate(ps)]
        jobs.append(collect(eng, "seeded", ps[0], SEEDED))
        *batched, seeded = await asyncio.gather(*jobs)
        assert eng.stats().preemptions > 0, "the budget was meant to force preemption"
        assert batched == alone
        assert seeded == seeded_alone
        await wait_idle(eng)
        eng.scheduler.check_integrity()
        assert eng.stats().kv_blocks_used == 0
    finally:
        await eng.shutdown(5)


async def test_seed_alone_equals_seed_in_a_batch():
    ps = prompts(6, seed=2)
    eng = await started()
    try:
        alone = await collect(eng, "alone", ps[0], SEEDED)
        others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 5
        jobs = [collect(eng, f"o{i}", p, sp) for i, (p, sp) in enumerate(
            zip(ps[1:], others, strict=True))]
        got = await asyncio.gather(collect(eng, "batched", ps[0], SEEDED), *jobs)
        assert got[0] == alone
        unseeded = await collect(eng, "other-seed", ps[0],
                                 SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95,
                                                top_k=40, seed=99, ignore_eos=True))
        assert unseeded != alone
    finally:
        await eng.shutdown(5)


async def test_50_random_cancellations_free_everything():
    ps = prompts(50, seed=3)
    rng = random.Random(7)
    eng = await started(scheduler=SchedulerConfig(max_step_tokens=64, prefill_chunk=16))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    async def consume(i, p):
        it = eng.generate(Request(f"c{i}", p, params))
        mode, k = i % 3, rng.randint(0, 6)
        n = 0
        async for _ in it:
            n += 1
            if mode == 0 and n > k:
                await it.aclose()  # client went away
                return
            if mode == 1 and n > k:
                eng.abort(f"c{i}")

    tasks = [asyncio.create_task(consume(i, p)) for i, p in enumerate(ps)]
    await asyncio.sleep(0.05)
    for t in tasks[2::3]:
        await asyncio.sleep(rng.random() * 0.02)
        t.cancel()  # task cancelled mid-stream
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_idle(eng)
    eng.scheduler.check_integrity()
    assert eng.stats().kv_blocks_used == 0 and eng.stats().running == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert all(t.done() for t in tasks)
    assert eng.stats().generated_tokens < 50 * 30, "requests were cut short"
    await eng.shutdown(5)
    assert eng._thread is None


async def test_errors_are_raised_at_submit():
    eng = await started(scheduler=SchedulerConfig(max_queued=0, max_context=64))
    try:
        with pytest.raises(RequestError) as e:
            eng.generate(Request("x", tuple(range(60)), SamplingParams(max_tokens=10)))
        assert e.value.kind == "too_long"
        with pytest.raises(RequestError) as e:
            eng.generate(Request("y", (1, 2, 3), GREEDY))
        assert e.value.kind == "queue_full"
    finally:
        await eng.shutdown(1)
    with pytest.raises(RequestError) as e:
        eng._thread = object()  # started, but shut down: refused as shutting_down
        eng.generate(Request("z", (1, 2, 3), GREEDY))
    assert e.value.kind == "shutting_down"


async def test_stop_string_across_tokens_is_not_emitted():
    eng = await started()
    p = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    try:
        text = "".join([d.text async for d in eng.generate(Request("full", p, params))])
        windows = [text[i : i + 2] for i in range(1, len(text) - 2)
                   if "\ufffd" not in text[i : i + 2]]
        assert windows, f"no decodable window in {text!r}"
        stop = windows[0]
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))
        deltas = [d async for d in eng.generate(Request("stopped", p, params))]
        assert "".join(d.text for d in deltas) == text[: text.find(stop)]
        assert deltas[-1].finish_reason == "stop"
        await wait_idle(eng)
        assert eng.stats().kv_blocks_used == 0
    finally:
        await eng.shutdown(5)

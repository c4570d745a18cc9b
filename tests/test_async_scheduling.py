"""Async scheduling: a pure-decode step planned and submitted while the one before it
runs (``Scheduler.schedule_next``), its tokens fed from that step's samples.

The scheduler side runs over the shadow executor (a wrong block, a lost or repeated token
changes every later sample); the engine side on the embedded tiny model against mlx-lm's
greedy output and against the same engine with async scheduling off."""

from __future__ import annotations

import asyncio
import dataclasses

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from models import make_cuda
from sched_fakes import ShadowExecutor, drive, make, reference, req
from test_engine import started

from slabserve.engine.config import RunnerConfig
from slabserve.engine.step import PENDING, GrammarSpec, StepPlan
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.loop import ThreadedServingLoop


class AheadShadow(ShadowExecutor):
    """The shadow executor with ``submit``/``collect``: a submitted plan runs at once
    (the 'device'), its ``PENDING`` tokens taken from the previous submitted plan's
    samples, as the model executor reads them on the device."""

    overlaps = True

    def __init__(self, base: ShadowExecutor) -> None:
        super().__init__(base.allocator, base.block_size)
        self.outs: dict[int, object] = {}
        self.last: dict[str, int] = {}
        self.pending_fed = 0

    def submit(self, plan: StepPlan) -> None:
        if any(c.tokens == (PENDING,) for c in plan.decodes):
            self.pending_fed += len(plan.decodes)
            plan = dataclasses.replace(plan, decodes=tuple(
                dataclasses.replace(c, tokens=(self.last[c.request_id],))
                for c in plan.decodes))
        out = super().execute(plan)
        self.last = {rid: t.token_id for rid, t in out.sampled.items()}
        self.outs[plan.step] = out

    def collect(self, plan: StepPlan):
        return self.outs.pop(plan.step)


def test_pipelined_decodes_equal_the_reference_and_free_every_block():
    s, ex = make(num_blocks=64, block_size=4)
    reqs = [req(f"r{i}", 3 + 2 * i, max_tokens=9 + i) for i in range(4)]
    for r in reqs:
        s.add(r)
    tokens, reasons, ahead = drive(s, AheadShadow(ex))
    for r in reqs:
        assert tokens[r.request_id] == reference(r.prompt_tokens, r.params.max_tokens)
        assert reasons[r.request_id] == "length"
    assert ahead > 0
    assert s.allocator.num_used == 0 and s.generated_tokens == sum(9 + i for i in range(4))


def test_a_stop_token_while_the_next_step_runs_drops_that_steps_token():
    s, ex = make(num_blocks=64, block_size=4)
    plain = req("plain", 5, max_tokens=12)
    ref = reference(plain.prompt_tokens, 12)
    stopper = req("stopper", 5, max_tokens=12, stop_token_ids=(ref[4],))
    s.add(plain)
    s.add(stopper)
    shadow = AheadShadow(ex)
    tokens, reasons, ahead = drive(s, shadow)
    assert tokens["stopper"] == ref[:5] and reasons["stopper"] == "stop"
    assert tokens["plain"] == ref and reasons["plain"] == "length"
    assert ahead > 0 and s.allocator.num_used == 0
    # the stopper decoded once more than it kept (the step planned while its stop ran)
    assert shadow.pending_fed > len(ref) - 1


def test_schedule_next_declines_what_needs_the_tokens_first():
    s, ex = make(num_blocks=64, block_size=4)
    s.add(req("a", 3, max_tokens=8))
    plan = s.schedule()  # the prompt: a prefill
    assert s.schedule_next(plan) is None
    s.update(plan, ex.execute(plan))
    plan = s.schedule()
    assert plan.decodes and not plan.prefills
    s.add(req("b", 3, max_tokens=8))  # a waiting request: admit it after the update
    assert s.schedule_next(plan) is None
    s.update(plan, ex.execute(plan))
    for params in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5},
                   {"constraint": GrammarSpec("regex", "[a-z]+")}):
        t, _ = make(num_blocks=64, block_size=4)
        t.add(req("p", 3, max_tokens=8, **params))
        first = t.schedule()
        t.update(first, ex.execute(first))
        assert t.schedule_next(t.schedule()) is None, params


def test_a_full_batch_plans_ahead_with_requests_waiting():
    """At ``max_running`` a waiting request cannot be admitted anyway: steps are planned
    ahead, and every request still gets the reference tokens."""
    s, ex = make(num_blocks=64, block_size=4, max_running=2)
    reqs = [req(f"r{i}", 3 + i, max_tokens=6 + 2 * i) for i in range(4)]
    for r in reqs:
        s.add(r)
    first = s.schedule()
    s.update(first, ex.execute(first))
    plan = s.schedule()
    assert s.waiting and s.schedule_next(plan) is not None
    s2, ex2 = make(num_blocks=64, block_size=4, max_running=2)
    for r in reqs:
        s2.add(r)
    tokens, reasons, ahead = drive(s2, AheadShadow(ex2))
    assert [tokens[r.request_id] for r in reqs] == [
        reference(r.prompt_tokens, r.params.max_tokens) for r in reqs]
    assert ahead > 0 and s2.allocator.num_used == 0


def test_schedule_next_leaves_out_what_ends_by_length_and_reserves_blocks():
    s, ex = make(num_blocks=64, block_size=4)
    s.add(req("short", 4, max_tokens=2))
    s.add(req("long", 4, max_tokens=9))
    plan = s.schedule()
    s.update(plan, ex.execute(plan))
    plan = s.schedule()  # decodes the second tokens: 'short' ends there
    nxt = s.schedule_next(plan)
    assert [c.request_id for c in nxt.decodes] == ["long"]
    c = nxt.decodes[0]
    assert c.tokens == (PENDING,) and c.start == 5 and c.output_index == 2
    assert len(c.blocks) * 4 >= c.start + 1  # the table covers the position it writes


def test_schedule_next_declines_when_blocks_run_short():
    s, ex = make(num_blocks=2, block_size=4, watermark_blocks=0)
    s.add(req("a", 3, max_tokens=6))
    s.add(req("b", 3, max_tokens=6))
    plan = s.schedule()  # both prompts: one block each, none left
    s.update(plan, ex.execute(plan))
    plan = s.schedule()  # position 3: still in the first blocks
    assert len(plan.decodes) == 2 and s.allocator.num_available == 0
    assert s.schedule_next(plan) is None  # position 4 needs blocks only preemption frees
    s.update(plan, ex.execute(plan))
    assert s.schedule().preempted  # the synchronous plan preempts instead


async def test_the_loop_pipelines_over_the_shadow_executor():
    s, ex = make(num_blocks=64, block_size=4)
    eng = ThreadedServingLoop(s, AheadShadow(ex))
    await eng.start()
    try:
        reqs = [req(f"r{i}", 3 + i, max_tokens=10) for i in range(3)]

        async def run(r):
            return [t async for d in eng.generate(r) for t in d.token_ids]

        got = await asyncio.gather(*[run(r) for r in reqs])
        assert got == [reference(r.prompt_tokens, 10) for r in reqs]
        assert eng.ahead_steps > 0 and eng.stats().kv_blocks_used == 0
        st = eng.stats()  # decode-only steps collected after being submitted ahead
        assert 0 < st.decode_steps_ahead <= min(st.decode_steps, eng.ahead_steps)
    finally:
        await eng.shutdown(1)


async def test_calls_between_steps_see_no_step_in_flight():
    s, ex = make(num_blocks=64, block_size=4)
    shadow = AheadShadow(ex)
    eng = ThreadedServingLoop(s, shadow)
    await eng.start()
    try:
        stream = eng.generate(req("long", 3, max_tokens=200))
        first = asyncio.ensure_future(stream.__anext__())  # decoding goes on meanwhile
        seen = [await eng.between_steps(lambda: not shadow.outs) for _ in range(20)]
        await first
        assert all(seen) and eng.ahead_steps > 0
        await stream.aclose()
    finally:
        await eng.shutdown(1)


# ---- the model executor on the embedded tiny model (compiled decode on a GPU) ----------
@pytest.fixture(scope="module")
def model_dir(model_root):
    """A llama with head_dim 64 (a shape the CUDA kernels take: on a GPU the decode steps
    run as step graphs, fed the pending tokens on the device)."""
    return str(make_cuda(model_root))


async def _engine(async_on: bool, model: str):
    return await started(
        model=model, runner=RunnerConfig(compile_decode=mx.default_device().type == mx.gpu),
        scheduler=SchedulerConfig(max_step_tokens=96, prefill_chunk=32,
                                  async_scheduling=async_on))


async def _outputs(eng, prompts, params, tag="q"):
    async def one(i, p):
        out, lps, last = [], [], None
        async for d in eng.generate(Request(f"{tag}{i}", p, params)):
            out += d.token_ids
            lps += [(lp.token_id, round(lp.logprob, 4)) for lp in d.logprobs or ()]
            last = d
        return out, lps, last.finish_reason
    return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])


PROMPTS = [tuple((7 * i + 3 * j) % 250 + 1 for j in range(5 + 9 * i)) for i in range(5)]


def _traces(eng) -> int:
    return eng.executor.decode_graph_traces()


async def test_model_engine_async_equals_mlx_lm_and_the_synchronous_engine(model_dir):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7,
                            ignore_eos=True)
    results = {}
    for on in (True, False):
        eng = await _engine(on, model_dir)
        try:
            results[on] = [await _outputs(eng, PROMPTS, p) for p in (greedy, seeded)]
            assert (eng.ahead_steps > 0) == on
            if mx.default_device().type == mx.gpu:  # the pending tokens fed step graphs
                assert _traces(eng) > 0
            assert eng.stats().kv_blocks_used == 0
            model = eng.executor.runner.model
        finally:
            await eng.shutdown(5)
    assert results[True] == results[False]
    for p, (tokens, _, reason) in zip(PROMPTS[:2], results[True][0][:2], strict=True):
        ref = [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=24)]
        assert tokens == ref and reason == "length"


async def test_model_engine_stop_token_mid_flight_keeps_outputs_and_frees_blocks(model_dir):
    eng = await _engine(True, model_dir)
    try:
        model = eng.executor.runner.model
        ref = [int(t) for t, _ in generate_step(mx.array(PROMPTS[1]), model, max_tokens=20)]
        k = next(i for i in range(6, 20) if ref[i] not in ref[:i])
        stop = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(ref[k],))
        plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        got = await asyncio.gather(_outputs(eng, [PROMPTS[1]], stop, "stop"),
                                   _outputs(eng, [PROMPTS[1]], plain, "plain"))
        (tokens, _, reason), = got[0]
        assert tokens == ref[: k + 1] and reason == "stop"
        assert got[1][0][0] == ref
        assert eng.ahead_steps > 0
        for _ in range(200):
            if eng.scheduler.allocator.num_used == 0:
                break
            await asyncio.sleep(0.01)
        eng.scheduler.check_integrity()
    finally:
        await eng.shutdown(5)

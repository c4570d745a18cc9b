"""The asyncio front over the fake executor (no MLX): failures, shutdown, stats, control
between steps (the attention path switch)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sched_fakes import ShadowExecutor, make, reference, req

from slabserve.scheduler.api import RequestError
from slabserve.scheduler.loop import ThreadedServingLoop


class Flaky(ShadowExecutor):
    """Raises on step ``fail_at``; sleeps ``delay`` seconds per step."""

    def __init__(self, base: ShadowExecutor, fail_at: int = -1, delay: float = 0.0) -> None:
        super().__init__(base.allocator, base.block_size)
        self.fail_at, self.delay, self.calls = fail_at, delay, 0

    def execute(self, plan):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        return super().execute(plan)


async def engine(fail_at=-1, delay=0.0, **cfg):
    s, ex = make(num_blocks=32, **cfg)
    eng = ThreadedServingLoop(s, Flaky(ex, fail_at, delay))
    await eng.start()
    return eng


async def run(eng, r):
    return [d async for d in eng.generate(r)]


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on():
    eng = await engine(fail_at=3)
    try:
        got = await asyncio.gather(*[run(eng, req(f"r{i}", 3, max_tokens=8)) for i in range(3)])
        for deltas in got:
            assert deltas[-1].finish_reason == "error" and "boom" in deltas[-1].error
        assert eng.stats().kv_blocks_used == 0
        r = req("after", 5, max_tokens=4)
        deltas = await run(eng, r)
        assert [t for d in deltas for t in d.token_ids] == reference(r.prompt_tokens, 4)
        assert deltas[-1].finish_reason == "length"
    finally:
        await eng.shutdown(1)


async def test_shutdown_refuses_new_work_and_aborts_after_timeout():
    eng = await engine(delay=0.01)
    stream = eng.generate(req("long", 3, max_tokens=120))  # >= 1.2 s of steps
    first = await stream.__anext__()
    assert first.token_ids
    stop = asyncio.create_task(eng.shutdown(0.05))
    await asyncio.sleep(0)
    with pytest.raises(RequestError) as e:
        eng.generate(req("late", 3))
    assert e.value.kind == "shutting_down"
    rest = [d async for d in stream]
    await stop
    assert rest[-1].finish_reason == "abort"
    assert eng.scheduler.allocator.num_used == 0 and eng._thread is None


async def test_stats_count_tokens_and_requests():
    eng = await engine()
    try:
        await asyncio.gather(*[run(eng, req(f"r{i}", 4, max_tokens=3)) for i in range(4)])
        st = eng.stats()
        assert (st.prompt_tokens, st.generated_tokens, st.running, st.waiting) == (16, 12, 0, 0)
        assert st.kv_blocks_total == 32 and st.kv_blocks_used == 0
    finally:
        await eng.shutdown(1)


async def test_stats_sum_the_decode_only_steps():
    """One request of 3 prompt tokens and 6 output tokens: its first step prefills (and
    samples the first token), the next 5 only decode; their count and time (each at least
    the executor's 10 ms sleep) are what /metrics' decode_step_seconds reports."""
    eng = await engine(delay=0.01)
    try:
        await run(eng, req("r", 3, max_tokens=6))
        st = eng.stats()
        decodes = [r for r in eng.step_log if r.prefill_tokens == 0]
        assert st.decode_steps == len(decodes) == 5 and len(eng.step_log) == 6
        assert st.decode_step_seconds == pytest.approx(sum(r.total_s for r in decodes))
        assert st.decode_step_seconds >= 5 * 0.01
        phases = dict(st.decode_phase_seconds)
        assert list(phases) == ["schedule", "forward", "sample", "wait", "update", "deliver"]
        assert phases["forward"] == pytest.approx(sum(r.forward_s for r in decodes))
        assert sum(phases.values()) == pytest.approx(st.decode_step_seconds)
        assert phases["wait"] >= 5 * 0.01  # the executor sleeps in collect (execute)
        # the engine thread's CPU time outside the wait fits in those phases' wall time
        assert 0 < st.decode_host_cpu_seconds <= st.decode_step_seconds - phases["wait"] + 1e-3
        # the histogram: every step at least 10 ms, none in the buckets below it
        bounds = dict(st.decode_step_buckets)
        assert bounds[0.008] == 0 and bounds[float("inf")] == 5
        assert [n for _, n in st.decode_step_buckets] == sorted(
            n for _, n in st.decode_step_buckets)
    finally:
        await eng.shutdown(1)


class Switchable(ShadowExecutor):
    """Has an attention path setting; records each step's setting, every switch, and the
    thread of every call; a switch during ``execute`` fails.  The second step sets
    ``parked`` and waits for ``gate`` (so a test can queue a switch while it is in
    flight)."""

    def __init__(self, base: ShadowExecutor) -> None:
        super().__init__(base.allocator, base.block_size)
        self.path, self.in_step = "auto", False
        self.gate, self.parked = threading.Event(), threading.Event()
        self.events: list[tuple[str, str]] = []
        self.threads: set[int] = set()

    def attention_path(self):
        return self.path

    def set_attention_path(self, path):
        assert not self.in_step, "switched while a step was in flight"
        self.threads.add(threading.get_ident())
        previous, self.path = self.path, path
        self.events.append(("switch", path))
        return previous

    def execute(self, plan):
        self.in_step = True
        try:
            self.threads.add(threading.get_ident())
            if len(self.events) == 1:
                self.parked.set()
                assert self.gate.wait(30)
            self.events.append(("step", self.path))
            return super().execute(plan)
        finally:
            self.in_step = False


async def test_attention_path_switch_runs_between_steps_on_the_engine_thread():
    s, ex = make(num_blocks=32)
    sw = Switchable(ex)
    eng = ThreadedServingLoop(s, sw)
    await eng.start()
    try:
        r = req("long", 3, max_tokens=6)
        stream = eng.generate(r)
        tokens = list((await stream.__anext__()).token_ids)
        assert await asyncio.to_thread(sw.parked.wait, 30)  # step 2 in flight
        switch = asyncio.create_task(eng.set_attention_path("gather"))
        await asyncio.sleep(0)  # queued while step 2 is in flight
        sw.gate.set()
        assert await switch == "auto"
        assert eng.attention_path() == "gather"
        tokens += [t async for d in stream for t in d.token_ids]
        assert tokens == reference(r.prompt_tokens, 6)  # the switch lost no token
        assert sw.threads == {eng._thread.ident} != {threading.get_ident()}
        assert sw.events == [("step", "auto")] * 2 + [("switch", "gather")] + [
            ("step", "gather")] * 4
        assert await eng.set_attention_path("auto") == "gather"  # idle engine: applied too
        with pytest.raises(RequestError) as e:
            await eng.set_attention_path("fast")
        assert e.value.kind == "invalid" and sw.path == "auto"
    finally:
        await eng.shutdown(1)
    with pytest.raises(RequestError) as e:
        await eng.set_attention_path("native")
    assert e.value.kind == "shutting_down"


async def test_between_steps_returns_errors_and_engines_without_a_switch_refuse():
    eng = await engine()
    try:
        assert eng.attention_path() is None
        with pytest.raises(RequestError) as e:
            await eng.set_attention_path("native")
        assert e.value.kind == "invalid"
        with pytest.raises(ZeroDivisionError):
            await eng.between_steps(lambda: 1 / 0)
        assert await eng.between_steps(threading.get_ident) == eng._thread.ident
        r = req("after", 4, max_tokens=3)  # the engine goes on
        assert [t for d in await run(eng, r) for t in d.token_ids] == reference(
            r.prompt_tokens, 3)
    finally:
        await eng.shutdown(1)


class SlowSubmit(ShadowExecutor):
    """Sleeps ``delay`` seconds in ``submit``: host time that is not CPU time."""

    def __init__(self, base: ShadowExecutor, delay: float) -> None:
        super().__init__(base.allocator, base.block_size)
        self.delay = delay

    def submit(self, plan):
        time.sleep(self.delay)


async def test_host_time_off_the_cpu_shows_as_stall():
    """A submit that sleeps (as a thread waiting for the GIL would) adds to the host
    phases' wall time but not to the engine thread's CPU time: step - wait - CPU >= the
    sleeps, what the load tester reports as ``stall``."""
    s, ex = make(num_blocks=32)
    eng = ThreadedServingLoop(s, SlowSubmit(ex, 0.01))
    await eng.start()
    try:
        await run(eng, req("r", 3, max_tokens=6))
        # the last step is recorded after its tokens are delivered (its deliver phase)
        for _ in range(200):
            if (st := eng.stats()).decode_steps == 5:
                break
            await asyncio.sleep(0.01)
        wait = dict(st.decode_phase_seconds)["wait"]
        stall = st.decode_step_seconds - wait - st.decode_host_cpu_seconds
        assert st.decode_steps == 5 and stall >= 5 * 0.01 - 1e-3
        assert wait < 5 * 0.01  # the sleep is not in the wait
    finally:
        await eng.shutdown(1)

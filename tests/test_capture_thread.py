"""Start-up capture on the thread that serves: MLX caches a compiled function per default
stream, and the engine thread has its own, so graphs captured elsewhere are traced again
there (the step's own tables at hand: they once failed and ran staged for good), and the
serving loop captures on its engine thread before it serves."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
from mlx_lm.utils import load
from models import make
from test_runner import prompts, reference
from test_step_graph import graph_runner, stand_in

from slabserve.build import assemble
from slabserve.engine.generate import greedy_generate
from slabserve.engine.step_graph import capture_sizes
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig


@stand_in
def test_graphs_captured_on_one_thread_serve_another(model_root):
    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = graph_runner(model, slab_tokens=1024)
    assert runner.capture_decode(capture_sizes(2)) == 2
    ps, got = prompts(2, seed=31), {}

    def serve():  # the engine thread's order: its own stream, then steps
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        got["tokens"] = greedy_generate(runner, ps, 6)

    t = threading.Thread(target=serve)
    t.start()
    t.join()
    assert got["tokens"] == [reference(model, p, 6) for p in ps]
    assert not runner.step_graphs._failed
    assert runner.step_graphs.traces > 2  # the same signatures, traced on the new stream
    assert runner.allocator.num_used == 0


@stand_in
async def test_the_loop_captures_on_its_engine_thread(model_root):
    """After ``start`` the sizes are traced; a request of a captured size traces nothing."""
    model, tok = load(str(make(model_root, "llama-gqa")))
    runner = graph_runner(model, slab_tokens=1024)
    loop = assemble(runner, tok, SchedulerConfig(), "t", capture_max_batch=2)
    await loop.start()
    try:
        captured = runner.graph_traces
        assert captured == 2
        # the compiled sampler's temperature-only graph is traced with them
        assert loop.executor.sampler.feature_sets == 1
        p = prompts(1, seed=33)[0]
        out = []
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        async for d in loop.generate(Request("a", tuple(p), params)):
            out += d.token_ids
        assert out == reference(model, p, 8)
        assert runner.graph_traces == captured and not runner.step_graphs._failed
        traces, calls = loop.executor.sampler.traces, loop.executor.sampler.calls
        sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)

        async def drain(rid: str) -> None:
            async for _ in loop.generate(Request(rid, tuple(p), sampled)):
                pass

        await asyncio.gather(drain("b"), drain("c"))  # two rows: the compiled sampler
        assert loop.executor.sampler.feature_sets == 1  # served by the warmed graph
        assert loop.executor.sampler.traces == traces
        assert loop.executor.sampler.calls > calls
    finally:
        await loop.shutdown(5.0)

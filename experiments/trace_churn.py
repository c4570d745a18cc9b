"""How many decode step graphs a stream of staggered requests traces (engine/step_graph.py),
with the batch padded to buckets and without: on CPU, the CUDA path's Python with
stand-in kernels (experiments.step_profile's ``FakeLaunchCUDA``; a signature does not
depend on what the kernel computes), the scheduler planning real steps.
``python -m experiments.trace_churn --requests 48 --every 3``."""

from __future__ import annotations

import argparse
import random
from unittest import mock

# a small llama with head_dim 64, a shape the CUDA path takes (the embedded tiny's is 32)
HEAD_DIM_64 = dict(model_type="llama", hidden_size=256, num_hidden_layers=3,
                   intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=259, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=4096, tie_word_embeddings=False)


def run(padded: bool, a: argparse.Namespace) -> tuple[int, int]:
    """(steps, graphs traced) of one closed run of ``a.requests`` staggered requests."""
    from mlx_lm.utils import load

    from experiments.step_profile import FakeLaunchCUDA
    from slabserve import env
    from slabserve.attention import Selector
    from slabserve.engine import step_graph
    from slabserve.engine.config import CacheConfig, RunnerConfig
    from slabserve.engine.embedded import TINY_GAIN, write_model_dir
    from slabserve.engine.executor import ModelExecutor
    from slabserve.engine.runner import ModelRunner
    from slabserve.scheduler.api import Request, SamplingParams
    from slabserve.scheduler.config import SchedulerConfig
    from slabserve.scheduler.scheduler import Scheduler

    path = env.cache_dir() / "models" / "trace-churn-llama-hd64"
    if not (path / "config.json").exists():
        write_model_dir(path, HEAD_DIM_64, "float32", seed=0, gain=TINY_GAIN)
    model = load(str(path))[0]
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=a.slab_tokens,
                                            kv_budget_bytes=1 << 28),
                         RunnerConfig(compile_decode=True, linear_layout=False),
                         Selector(override=True, natives={"cpu": FakeLaunchCUDA()}))
    executor = ModelExecutor(runner, 4096)
    sched = Scheduler(SchedulerConfig(max_running=a.max_running, async_scheduling=False),
                      runner.allocator, runner.block_size, 4096)
    rng = random.Random(a.seed)
    pending = [Request(f"r{i}", tuple(rng.randrange(1, 250) for _ in range(rng.randint(10, 60))),
                       SamplingParams(max_tokens=rng.randint(10, 40), temperature=0.0,
                                      ignore_eos=True)) for i in range(a.requests)]
    steps = 0
    bucket = step_graph.batch_bucket if padded else (lambda b: b)
    with mock.patch.object(step_graph, "batch_bucket", bucket):
        while pending or sched.has_work:
            if pending and steps % a.every == 0:
                sched.add(pending.pop(0))
            plan = sched.schedule()
            sched.update(plan, executor.execute(plan))
            steps += 1
    return steps, runner.step_graphs.traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--every", type=int, default=3, help="steps between arrivals")
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--slab-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for padded in (True, False):
        steps, traces = run(padded, a)
        print(f"{'padded' if padded else 'exact '} batch: {steps} steps, {traces} graphs traced")


if __name__ == "__main__":
    main()

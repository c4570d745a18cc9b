"""Where a decode step's device time goes on CUDA, kernel by kernel, per model shape.

On an H100 the Qwen2.5-0.5B shape's one-stream server step waited 2.0-2.9 ms of 5.1-5.5
ms for the device, where Llama-3.2-1B's waited 0.2-0.5 ms of 2.0 with 2.5x the weights
(docs/benchmarks/loadtest-gpu.md). This runs waited decode steps of each embedded model
(the runner and pool as ``slabserve bench decode-phases`` builds them, step graphs on)
under PyTorch's profiler. Per step it reports the kernels' count and busy time, and the
kernels by name (median microseconds a step, ranked). MLX's graph budget is set as
`slabserve` sets it (slabserve.mlxgraphs).

    python -m experiments.step_kernels --models llama-3.2-1b,qwen2.5-0.5b --batch 1 --ctx 1024
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from slabserve.bench.device_time import StepKernels, kernels_by_step, summarize, trace


def profile_steps(step, steps: int) -> list[tuple[StepKernels, dict[str, list[float]]]]:
    """Per step, its kernels' count, busy and span (bench/device_time.py), and kernel name
    -> durations (us) of the kernels that started inside it."""
    out = []
    for kernels in kernels_by_step(trace(step, steps)):
        per: dict[str, list[float]] = defaultdict(list)
        for _, dur, name in kernels:
            per[name[:70]].append(dur)
        out.append((summarize(kernels), per))
    return out


def report(model: str, batch: int, ctx: int,
           steps: list[tuple[StepKernels, dict[str, list[float]]]], top: int) -> None:
    med = statistics.median
    span = med(k.span_us for k, _ in steps)
    busy = med(k.busy_us for k, _ in steps)
    count = med(k.kernels for k, _ in steps)
    per_step = [per for _, per in steps]
    print(f"\n{model}, B={batch}, ctx {ctx}: {len(per_step)} waited steps; median "
          f"{count:.0f} kernels, {busy:.0f} us busy and {span:.0f} us from the first "
          f"kernel's start to the last one's end a step")
    names = {n for s in per_step for n in s}
    rows = sorted(((med(sum(s.get(n, [])) for s in per_step),
                    med(len(s.get(n, [])) for s in per_step), n) for n in names),
                  reverse=True)
    print("| kernel | a step | us a step | us each | first of a step | longest of a step |")
    print("|---|--:|--:|--:|--:|--:|")
    for us, k, name in rows[:top]:
        first = med(s[name][0] for s in per_step if s.get(name))
        longest = med(max(s[name]) for s in per_step if s.get(name))
        print(f"| `{name}` | {k:.0f} | {us:.1f} | {us / max(k, 1):.1f} | {first:.1f} | "
              f"{longest:.1f} |")


def main() -> None:
    from slabserve.cli import prepare_mlx_env

    prepare_mlx_env()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.2-1b,qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    from slabserve.bench.decode_step import BenchConfig, fast_fill, load_runner, plan_step
    from slabserve.scheduler.api import SamplingParams

    for model in args.models.split(","):
        cfg = BenchConfig(model=model, dtype="bfloat16", mem_bytes=4 << 30)
        runner, executor, _ = load_runner(cfg)
        tables = fast_fill(runner, args.batch, args.ctx, 0)
        params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        tokens = [1] * args.batch

        def step(i: int, runner=runner, executor=executor, tables=tables, params=params,
                 tokens=tokens) -> None:
            out = executor.execute(plan_step(runner, tables, tokens, args.ctx + i, i, params))
            tokens[:] = [s.token_id for s in out.sampled.values()]

        for i in range(5):
            step(i)
        report(model, args.batch, args.ctx, profile_steps(lambda i, s=step: s(5 + i),
                                                          args.steps), args.top)
        for t in tables:
            runner.allocator.free(t)


if __name__ == "__main__":
    main()

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
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

SPAN = "(first kernel start to last kernel end)"


def profile_steps(step, steps: int) -> list[dict[str, list[float]]]:
    """Per step, kernel name -> durations (us) of the kernels that started inside it, and
    under ``SPAN`` the step's device span (first kernel's start to last kernel's end)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"step{i}"):
                step(i)
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("name", "").startswith("step") and e.get("ph") == "X"
                   and e.get("cat") == "user_annotation")
    kernels = [(e["ts"], e["dur"], e["name"]) for e in events
               if e.get("cat") == "kernel" and e.get("ph") == "X"]
    out = []
    for t0, t1 in marks:
        per: dict[str, list[float]] = defaultdict(list)
        first, last = None, None
        for ts, dur, name in kernels:
            if t0 <= ts <= t1:
                per[name[:70]].append(dur)
                first = ts if first is None else min(first, ts)
                last = ts + dur if last is None else max(last, ts + dur)
        per[SPAN] = [0.0 if first is None else last - first]
        out.append(per)
    return out


def report(model: str, batch: int, ctx: int, per_step: list[dict[str, list[float]]],
           top: int) -> None:
    med = statistics.median
    span = med(s.pop(SPAN)[0] for s in per_step)
    busy = med(sum(sum(d) for d in s.values()) for s in per_step)
    count = med(sum(len(d) for d in s.values()) for s in per_step)
    print(f"\n{model}, B={batch}, ctx {ctx}: {len(per_step)} waited steps; median "
          f"{count:.0f} kernels, {busy:.0f} us busy and {span:.0f} us from the first "
          f"kernel's start to the last one's end a step")
    names = {n for s in per_step for n in s}
    rows = sorted(((med(sum(s.get(n, [])) for s in per_step),
                    med(len(s.get(n, [])) for s in per_step), n) for n in names),
                  reverse=True)
    print("| kernel | a step | us a step | us each |")
    print("|---|--:|--:|--:|")
    for us, k, name in rows[:top]:
        print(f"| `{name}` | {k:.0f} | {us:.1f} | {us / max(k, 1):.1f} |")


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

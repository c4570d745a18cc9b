"""Where a decode step's host time goes: the graph's node count by primitive
(``mx.export_to_dot`` of one step), the build's median per step and per layer, and a
cProfile of the build, compiled stages, one batch / context cell: ``python -m
experiments.step_profile --embedded llama-3.2-1b:bfloat16 --batch 1 --ctx 1024``.

``--fake-cuda`` (CPU): decode attention runs the CUDA path's Python (attention/native_cuda.py:
plan, launch arguments, input lists, counters) with each ``mx.fast.cuda_kernel`` replaced by a
stand-in that returns zeros, so the GPU's per-layer host work is measured without a GPU
(the kernel call's own C++ cost is not in it; its outputs are not attention)."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from slabserve.attention.native_cuda import NativeCUDA


class FakeLaunchCUDA(NativeCUDA):
    """NativeCUDA whose kernels are stand-ins (module docstring): accepted on any device."""

    def _device_reason(self):
        return None

    def _probe(self, q, pool):
        return None

    def _compile(self, name, names, outs, body, smem, header):
        def kernel(*, inputs, output_shapes, output_dtypes, **_):
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes,
                                                          strict=True)]
        return kernel


def main() -> None:
    from slabserve.attention import Selector
    from slabserve.bench.decode_phases import one_step
    from slabserve.bench.decode_step import BenchConfig, fast_fill, load_runner, parse_model
    from slabserve.engine.config import RunnerConfig
    from slabserve.scheduler.api import SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--stages", action="store_true", help="compiled stages, no step graph")
    ap.add_argument("--fake-cuda", action="store_true")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--path", choices=["auto", "native", "gather"], default="auto",
                    help="the decode attention path (the selector's override)")
    a = ap.parse_args()
    name, dtype = parse_model(a.embedded)
    cfg = BenchConfig(name, dtype, (a.batch,), (a.ctx,), ("auto",), a.steps, 3, 8 << 30, 16,
                      65536, 0)
    runner, executor, _ = load_runner(cfg, RunnerConfig(compile_decode=not a.eager,
                                                            step_graph=not a.stages))
    if a.fake_cuda:
        runner.attention.selector = Selector(natives={"cpu": FakeLaunchCUDA()})
    runner.attention.selector.set_override({"auto": None, "native": True,
                                            "gather": False}[a.path])
    tables = fast_fill(runner, a.batch, a.ctx, 0)
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    toks = [1] * a.batch
    for r in range(5):
        _, toks = one_step(runner, executor, tables, toks, a.ctx + r, r, params)
    seqs = executor_inputs(runner, tables, toks, a.ctx + 5)
    logits = runner._decode(seqs)  # the graph, not yet handed to the device
    dot = Path(tempfile.mkdtemp()) / "step.dot"
    mx.export_to_dot(str(dot), logits, *runner.pool.take_pending())
    ops = Counter(re.findall(r'label ="([A-Za-z]+)', dot.read_text()))
    mx.eval(logits)
    print(f"nodes {sum(ops.values())}: {ops.most_common(25)}")
    prof = cProfile.Profile()
    builds = []
    for r in range(a.steps):
        if not a.no_cprofile:
            prof.enable()
        st, toks = one_step(runner, executor, tables, toks, a.ctx + 6 + r, 6 + r, params)
        prof.disable()
        builds.append(st.build)
    med = float(np.median(builds)) * 1e6
    print(f"build median {med:.0f} us per step, {med / len(runner.caches):.1f} us per layer "
          f"({a.steps} steps, min {min(builds) * 1e6:.0f} us)")
    if not a.no_cprofile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def executor_inputs(runner, tables, toks, pos):
    from slabserve.engine.runner import SeqInput
    return [SeqInput([t], pos, tb) for t, tb in zip(toks, tables, strict=True)]


if __name__ == "__main__":
    main()

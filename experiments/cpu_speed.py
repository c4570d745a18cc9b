"""How fast this process's CPU is right now, beside the engine's decode step: does the
spread between processes of one server come from the engine or from the machine?

``python -m experiments.cpu_speed step [--rounds 25]``: the tiny model's eager decode step
(B=8, 1,000 tokens, float32) in rounds of three steps, each round followed by two
calibrations that share no code with the engine: a fixed MLX graph of the same kinds of
ops on arrays of its own (gathers, small matmuls, exp) and numpy's exp over 2^20 floats on
the main thread (no MLX).  Prints the medians and the step / MLX-calibration ratio; run it
in several processes one after another.

``python -m experiments.cpu_speed windows [--seconds 16]``: numpy's exp over 2^20 floats,
the median of each 2-second window in one process: whether the speed moves within a
process (time) or only between processes (placement).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

_XS = np.random.default_rng(0).normal(size=1 << 20).astype(np.float32)


def numpy_exp_ms(repeat: int = 4) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        np.exp(_XS)
    return (time.perf_counter() - t) / repeat * 1e3


def mlx_calibration():
    """A fixed graph of gathers, [2, 32] x [32, 512] matmuls and exp, eight times."""
    import mlx.core as mx

    a = mx.random.normal((8, 2, 2, 32))
    k = mx.random.normal((4096, 16, 32))
    idx = mx.array(np.random.default_rng(1).permutation(4096)[:512].astype(np.int32))
    mx.eval(a, k, idx)

    def run() -> float:
        t = time.perf_counter()
        x = a
        for _ in range(8):
            kk = k[idx].reshape(8, 2, 512, 32)
            s = x @ kk.swapaxes(-1, -2)
            p = mx.exp(s - s.max(-1, keepdims=True))
            x = (p @ kk) / p.sum(-1, keepdims=True)
        mx.eval(x)
        return (time.perf_counter() - t) * 1e3
    return run


def step_vs_calibration(rounds: int) -> None:
    from slabserve.bench.decode_phases import one_step
    from slabserve.bench.decode_step import BenchConfig, fast_fill, load_runner
    from slabserve.engine.config import RunnerConfig
    from slabserve.scheduler.api import SamplingParams

    b, ctx = 8, 1000
    cfg = BenchConfig("tiny", "float32", (b,), (ctx,), ("auto",), 30, 3, 2 << 30, 16, 65536, 0)
    runner, ex, _ = load_runner(cfg, RunnerConfig(compile_decode=False, step_graph=False))
    tables = fast_fill(runner, b, ctx, 0)
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    calib = mlx_calibration()
    toks, pos, steps, mlx_ms, np_ms = [1] * b, 0, [], [], []
    for r in range(rounds + 2):  # two rounds of warm-up
        for _ in range(3):
            st, toks = one_step(runner, ex, tables, toks, ctx + pos, pos, params)
            pos += 1
            if r >= 2:
                steps.append((st.plan + st.build + st.launch + st.sync) * 1e3)
        m, n = calib(), numpy_exp_ms()
        if r >= 2:
            mlx_ms.append(m)
            np_ms.append(n)
    s, m = float(np.median(steps)), float(np.median(mlx_ms))
    print(f"step {s:.2f} ms  mlx calibration {m:.2f} ms  numpy exp {np.median(np_ms):.2f} ms"
          f"  step / mlx calibration {s / m:.3f}")


def windows(seconds: float) -> None:
    out, end = [], time.time() + seconds
    while time.time() < end:
        ts, t0 = [], time.time()
        while time.time() - t0 < 2:
            ts.append(numpy_exp_ms(1))
        out.append(float(np.median(ts)))
    print("numpy exp ms per 2 s window: " + " ".join(f"{x:.2f}" for x in out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["step", "windows"])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--seconds", type=float, default=16.0)
    a = ap.parse_args()
    if a.mode == "step":
        step_vs_calibration(a.rounds)
    else:
        windows(a.seconds)


if __name__ == "__main__":
    main()

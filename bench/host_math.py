"""Host math (attention/host_math.py) against MLX's own CPU ops, side by side in one run.

``slabserve bench host-math`` (the launcher preloads OpenBLAS, as for the server; a bare
``python -m slabserve.bench.host_math`` needs ``LD_PRELOAD`` set to libopenblas by hand).

1. Per-layer ops at Qwen2.5-0.5B shapes, float32: causal prefill attention (14 q heads,
   2 kv heads, head_dim 64; ``L`` queries over ``n`` keys) as MLX's SDPA vs
   ``host_math.causal_attention``, and the MLP's ``silu(g) * y`` (intermediate 4864) as
   mlx-lm's ``swiglu`` vs ``host_math.silu_mul``.
2. One prefill of a ``--prompt``-token prompt through the real ``ModelRunner`` (chunks of
   ``--chunk`` tokens, as the CPU scheduler cuts them), host math off vs on, interleaved.
3. One decode step of ``--decodes`` sequences at the prompt's length: host math off, on
   (default threshold: decode keeps MLX), and forced (threshold 0: SiLU in numpy too).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import mlx.core as mx
from mlx_lm.models.activations import swiglu
from slabserve.attention import host_math as hm
from slabserve.bench.cpu_ops import median_ms
from slabserve.bench.step_overhead import add_runner_args, allocate_tokens, load_runner
from slabserve.engine.runner import SeqInput


def ops_table(reps: int) -> None:
    print("| op | shape | MLX ms | host ms | speed-up | max abs diff |")
    print("|---|---|--:|--:|--:|--:|")
    for length, n in ((256, 512), (256, 1024), (512, 1024)):
        q, k, v = (mx.random.normal(s) for s in ((1, 14, length, 64), (1, 2, n, 64),
                                                  (1, 2, n, 64)))
        mx.eval(q, k, v)
        ref = lambda q=q, k=k, v=v: mx.fast.scaled_dot_product_attention(  # noqa: E731
            q, k, v, scale=0.125, mask="causal")
        host = lambda q=q, k=k, v=v: hm.causal_attention(q, k, v, 0.125)  # noqa: E731
        a, b = median_ms(ref, reps), median_ms(host, reps)
        err = mx.max(mx.abs(ref() - host())).item()
        print(f"| causal attention | L={length} n={n} | {a:.1f} | {b:.1f} | {a / b:.1f}x "
              f"| {err:.1e} |")
    for tokens in (256, 512):
        g, y = mx.random.normal((1, tokens, 4864)), mx.random.normal((1, tokens, 4864))
        mx.eval(g, y)
        a = median_ms(lambda g=g, y=y: swiglu(g, y), reps)
        b = median_ms(lambda g=g, y=y: hm.silu_mul(g, y), reps)
        err = mx.max(mx.abs(swiglu(g, y) - hm.silu_mul(g, y))).item()
        print(f"| silu(g)*y | [{tokens}, 4864] | {a:.1f} | {b:.1f} | {a / b:.1f}x "
              f"| {err:.1e} |")


def prefill_s(runner, tokens: list[int], table: list[int], chunk: int) -> float:
    t = time.perf_counter()
    for s in range(0, len(tokens), chunk):
        part = tokens[s : s + chunk]
        pre, _ = runner.forward([SeqInput(part, s, table, s + len(part) == len(tokens))], [])
    mx.eval(pre[0])
    return time.perf_counter() - t


def decode_s(runner, seqs: list[SeqInput]) -> float:
    t = time.perf_counter()
    runner.forward([], seqs)
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Each of ``fns`` (name -> a run returning seconds) once as a warm-up, then ``reps``
    rounds running each in turn (a load change hits them alike): name -> seconds per run."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(fn())
    return runs


def print_prefill_runs(column: str, runs: dict[str, list[float]], prompt: int) -> None:
    """The prefill table: per mode the median seconds, tokens/s and every run."""
    print(f"| {column} | median s | tok/s | runs s |")
    print("|---|--:|--:|---|")
    for mode, ts in runs.items():
        med = statistics.median(ts)
        print(f"| {mode} | {med:.2f} | {prompt / med:.0f} | "
              + ", ".join(f"{t:.2f}" for t in ts) + " |")


MODES = {"off": (False, None), "on": (True, None), "forced": (True, 0)}


def timed(mode: str, fn) -> float:
    on, threshold = MODES[mode]
    old_on, old_min = hm.set_enabled(on), hm.set_min_elements(threshold)
    try:
        return fn()
    finally:
        hm.set_enabled(old_on)
        hm.set_min_elements(old_min)


def runner_tables(a) -> None:
    runner, _, name = load_runner(a)
    rng = random.Random(0)
    vocab = runner.model.args.vocab_size
    tokens = [rng.randrange(vocab) for _ in range(a.prompt)]
    table = allocate_tokens(runner, a.prompt)
    runs = interleaved({m: lambda m=m: timed(m, lambda: prefill_s(runner, tokens, table,
                                                                  a.chunk))
                        for m in ("off", "on")}, a.prefill_reps)
    print(f"\n{name} {a.dtype}: one {a.prompt}-token prefill in {a.chunk}-token chunks "
          f"({a.prefill_reps} runs each, interleaved)")
    print_prefill_runs("host math", runs, a.prompt)
    tables = [allocate_tokens(runner, a.prompt + 1) for _ in range(a.decodes)]
    seqs = [SeqInput([rng.randrange(vocab)], a.prompt, t) for t in tables]
    steps = interleaved({m: lambda m=m: timed(m, lambda: decode_s(runner, seqs))
                         for m in MODES}, a.decode_reps)
    print(f"\none decode step of {a.decodes} sequences at {a.prompt} tokens "
          f"({a.decode_reps} runs each, interleaved)")
    print("| host math | median ms |")
    print("|---|--:|")
    for mode, ts in steps.items():
        print(f"| {mode} | {1e3 * statistics.median(ts):.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench host-math")
    add_runner_args(ap, dtype="float32", kv_gib=1)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per op")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--decodes", type=int, default=8)
    ap.add_argument("--decode-reps", type=int, default=7)
    ap.add_argument("--ops-only", action="store_true", help="skip the runner tables")
    a = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"MLX {mx.__version__}, float32, host math workers {hm.workers()}, "
          f"threshold {hm.min_elements()} elements")
    ops_table(a.reps)
    if not a.ops_only:
        runner_tables(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

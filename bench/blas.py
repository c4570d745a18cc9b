"""``slabserve bench blas``: MLX on the Linux CPU with and without OpenBLAS, side by side.

Each configuration runs in its own subprocess (LD_PRELOAD works only at process start):
``openblas`` preloads the library ``slabserve.blas`` finds, ``reference`` strips it and
sets SLABSERVE_NO_OPENBLAS=1 so MLX uses its bundled reference BLAS.  Each worker checks
``slabserve.blas.status()`` and refuses to report under the wrong BLAS.  Both use the same
MLX cache limit (``slabserve.mlxmem.configure_memory``).

Per configuration: an n^3 float32 sgemm in GFLOP/s, then prefill and decode tok/s of an
embedded random-weight model with a real model's shapes, through mlx-lm's own
``generate_step`` and through slabserve's paged ``ModelRunner``.  Prefill tok/s = prompt
tokens / time to the first token; decode tok/s = later tokens / their time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CONFIGS = ("openblas", "reference")


def _sgemm_gflops(n: int, reps: int = 3) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _time_mlx_lm(model, prompt: list[int], n_decode: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    stamps, toks = [], []
    t0 = time.perf_counter()
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n_decode + 1,
                                sampler=lambda x: mx.argmax(x, axis=-1)):
        toks.append(int(tok))
        stamps.append(time.perf_counter())
    return _rates(len(prompt), t0, stamps, toks)


def _time_engine(model, prompt: list[int], n_decode: int) -> dict:
    import mlx.core as mx

    from slabserve.engine.config import CacheConfig
    from slabserve.engine.runner import ModelRunner, SeqInput
    from slabserve.kvcache import blocks_needed

    runner = ModelRunner(model, CacheConfig(kv_budget_bytes=1 << 30))
    total = len(prompt) + n_decode + 1
    table = runner.allocator.allocate(blocks_needed(total, runner.block_size))
    try:
        t0 = time.perf_counter()
        pre, _ = runner.forward([SeqInput(prompt, 0, table)], [])
        toks = [int(mx.argmax(pre[0]).item())]
        stamps = [time.perf_counter()]
        for i in range(n_decode):
            _, logits = runner.forward([], [SeqInput([toks[-1]], len(prompt) + i, table)])
            toks.append(int(mx.argmax(logits[0]).item()))
            stamps.append(time.perf_counter())
    finally:
        runner.allocator.free(table)
    return _rates(len(prompt), t0, stamps, toks)


def _rates(n_prompt: int, t0: float, stamps: list[float], toks: list[int]) -> dict:
    n_dec = len(stamps) - 1
    return {
        "prefill_tok_s": n_prompt / (stamps[0] - t0),
        "decode_tok_s": n_dec / (stamps[-1] - stamps[0]) if n_dec else None,
        "tokens": toks,
    }


def worker(args: argparse.Namespace) -> dict:
    """Run inside the configured subprocess; returns the JSON-able result."""
    import mlx.core as mx
    from mlx_lm.utils import load

    from slabserve import blas, env, mlxmem
    from slabserve.engine.embedded import ensure_model

    st = blas.status()
    if st["blas"] != args.worker:
        raise SystemExit(f"worker {args.worker!r} runs under {st['blas']!r} ({st['reason']})")
    mem = mlxmem.configure_memory(None)
    out = {"config": args.worker, "blas": st, "cache_limit_bytes": mem.cache_limit_bytes,
           "sgemm_n": args.sgemm, "sgemm_gflops": _sgemm_gflops(args.sgemm)}
    model, _ = load(str(ensure_model(args.model, args.dtype, cache_dir=env.cache_dir())))
    mx.random.seed(1)
    prompt = mx.random.randint(0, 256, (args.prompt,)).tolist()
    timers = {"mlx_lm": _time_mlx_lm, "engine": _time_engine}
    for path in args.paths.split(","):
        timers[path](model, prompt[:8], 2)  # warm-up: first-call costs out of the timing
        out[path] = timers[path](model, prompt, args.decode)
    return out


def _child_env(config: str, library: str | None) -> dict[str, str]:
    from slabserve import blas, env

    e = dict(os.environ)
    keep = [p for p in e.get("LD_PRELOAD", "").replace(":", " ").split()
            if blas.classify(p) not in ("openblas", "mkl", "blis")]
    e.pop(env.BLAS_REEXEC_MARKER, None)
    e.pop("SLABSERVE_NO_OPENBLAS", None)
    if config == "openblas":
        keep.insert(0, library or "")
    else:
        e["SLABSERVE_NO_OPENBLAS"] = "1"
    e["LD_PRELOAD"] = " ".join(keep)
    return e


def _run_config(config: str, library: str | None, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slabserve.bench.blas", "--worker", config, *argv]
    p = subprocess.run(cmd, env=_child_env(config, library), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{config} worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(results: list[dict], paths: list[str]) -> str:
    """Markdown table, one row per configuration, then the speed-up row."""
    head = ["config", "library", "sgemm GFLOP/s"]
    for p in paths:
        head += [f"{p} prefill tok/s", f"{p} decode tok/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "--:|" * (len(head) - 2)]
    for r in results:
        lib = os.path.basename(r["blas"]["library"] or "-")
        cells = [r["config"], lib, _fmt(r["sgemm_gflops"])]
        for p in paths:
            cells += [_fmt(r[p]["prefill_tok_s"]), _fmt(r[p]["decode_tok_s"])]
        rows.append("| " + " | ".join(cells) + " |")
    if len(results) == 2:
        a, b = results
        cells = ["speed-up", "", f"{a['sgemm_gflops'] / b['sgemm_gflops']:.1f}x"]
        for p in paths:
            for k in ("prefill_tok_s", "decode_tok_s"):
                cells.append(f"{a[p][k] / b[p][k]:.1f}x" if a[p][k] and b[p][k] else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slabserve bench blas", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b", help="embedded model shape")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode tokens after the first")
    ap.add_argument("--sgemm", type=int, default=1024, help="n of the n^3 sgemm")
    ap.add_argument("--paths", default="mlx_lm,engine", help="mlx_lm and/or engine")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None, help="write all results there")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from slabserve import blas

    library = blas.openblas_path()
    configs = [c for c in args.configs.split(",") if c != "openblas" or library]
    if len(configs) < len(args.configs.split(",")):
        print(f"OpenBLAS not found, running only {configs}; {blas.INSTALL_HINT}")
    results = []
    for c in configs:
        print(f"running {c} ...", flush=True)
        results.append(_run_config(c, library, argv))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"load avg {os.getloadavg()[0]:.1f}; model {args.model} {args.dtype}, "
          f"prompt {args.prompt}, decode {args.decode}")
    print(table(results, args.paths.split(",")))
    same = {json.dumps(r[p]["tokens"]) for r in results for p in args.paths.split(",")}
    print(f"greedy tokens identical across configs and paths: {len(same) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

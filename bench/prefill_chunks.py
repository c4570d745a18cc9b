"""``slabserve bench prefill-chunks``: does a prefill chunk pay for its exact shape?

Hypothesis: MLX's CUDA SDPA builds one cuDNN graph per q/k/v(/mask) shape (cached by
exact shape and strides), so a chunk whose kv length was never seen pays a graph build;
exact kv lengths (``attention/prefill.py`` slices the gathered K/V to ``n``) make that
every chunk after a cached prefix.  ``SLABSERVE_PREFILL_KV_BUCKET`` pads to a bounded set.

1. **Micro** (``prefill_attention`` itself on a real ``SlabPool`` and ``DecodeBatch``):
   per head shape and kv length ``n`` (q = ``--chunk`` tokens ending at ``n``), bucket
   off and on: the first call at ``n`` (``first``), the median of ``--reps`` repeats
   (``rep``), and the first call at ``n - --shift`` (``shift``: another request whose
   kv length differs by a few blocks; with a bucket it usually lands in a seen shape).
   Also MLX SDPA alone on contiguous K/V of a never-seen length ``n + 1``.
   Hypothesis holds where ``first`` >> ``rep`` and, bucket off, ``shift`` >> ``rep``.
2. **Runner** (``ModelRunner.forward`` per chunk, as the scheduler calls it): one
   ``--prompt``-token prompt in ``--chunk-tokens`` chunks, per bucket setting:
   ``A cold`` (first time), ``A warm`` (same prompt again), ``B shift`` (another prompt
   whose chunks start after a ``chunk/2 + 3`` block "cached prefix", computed as chunk 0).
   Plus mlx-lm's own prefill (``KVCache``, ``prefill_step_size`` = chunk), cold and warm.

Every call is synced (``mx.eval`` + ``mx.synchronize``).  One process; full results to
``--out`` (JSON); a short table last.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m slabserve.bench.prefill_chunks: OpenBLAS before mlx (CPU)
    from slabserve import blas

    blas.prepare_process()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402

from slabserve.attention import prefill as pf  # noqa: E402
from slabserve.attention.base import DecodeBatch  # noqa: E402
from slabserve.kvcache.pool import PoolGeometry, SlabPool, WritePlan  # noqa: E402

HEADS = ((14, 2, 64), (32, 8, 64))  # Qwen2.5-0.5B, Llama-3.2-1B-like
BLOCK = 16


def _sync_ms(fn) -> float:
    t = time.perf_counter()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return 1e3 * (time.perf_counter() - t)


def _median_ms(fn, reps: int) -> float:
    return statistics.median(_sync_ms(fn) for _ in range(reps))


# ---- 1. micro -----------------------------------------------------------------------
def _filled_pool(heads, max_kv: int, dtype) -> tuple[PoolGeometry, SlabPool, list[int]]:
    """One layer holding a ``max_kv``-token sequence of random K/V (blocks in order)."""
    _, kvh, d = heads
    geom = PoolGeometry(1, kvh, d, BLOCK, 4096 // BLOCK, dtype)
    nblk = -(-max_kv // BLOCK)
    pool = SlabPool(geom, initial_slabs=-(-nblk // geom.slab_blocks))
    table = list(range(nblk))
    plan = WritePlan(geom, [(table[p // BLOCK], p % BLOCK) for p in range(max_kv)])
    k, v = (mx.random.normal((max_kv, kvh, d)).astype(dtype) for _ in range(2))
    pool.write(0, plan, k, v)
    mx.eval(pool.take_pending())
    return geom, pool, table


def _call(geom, pool, table, q, kn, vn, n: int, bucket: int):
    """A closure running ``prefill_attention`` for a chunk ending at ``n`` (a fresh
    DecodeBatch per call, as the runner makes one per forward)."""
    scale = q.shape[-1] ** -0.5

    def run():
        prefix = DecodeBatch(geom, [table[: -(-n // BLOCK)]], [n])
        return pf.prefill_attention(q, kn, vn, pool, 0, prefix, scale, bucket=bucket)

    return run


def micro_heads(args, heads, dtype) -> list[dict]:
    qh, kvh, d = heads
    L = args.chunk
    geom, pool, table = _filled_pool(heads, args.max_kv + BLOCK, dtype)
    q = mx.random.normal((1, qh, L, d)).astype(dtype)
    kn, vn = (mx.random.normal((1, kvh, L, d)).astype(dtype) for _ in range(2))
    mx.eval(q, kn, vn)
    for bucket in (0, args.bucket):  # warm the non-SDPA kernels at a length never used
        _sync_ms(_call(geom, pool, table, q, kn, vn, L + 3 * BLOCK, bucket))
    rows = []
    for n in kv_lengths(args):
        row = {"heads": f"{qh}/{kvh}/{d}", "n": n}
        for tag, bucket in (("off", 0), ("on", args.bucket)):
            fn = _call(geom, pool, table, q, kn, vn, n, bucket)
            try:  # one GPU run: a failing mode is recorded, the others still run
                row[f"{tag}_first"] = _sync_ms(fn)
                row[f"{tag}_rep"] = _median_ms(fn, args.reps)
                row[f"{tag}_shift"] = _sync_ms(
                    _call(geom, pool, table, q, kn, vn, n - args.shift, bucket))
            except Exception as e:  # noqa: BLE001
                row[f"{tag}_error"] = f"{type(e).__name__}: {e}"
        k, v = (mx.random.normal((1, kvh, n + 1, d)).astype(dtype) for _ in range(2))
        mx.eval(k, v)

        def sdpa(k=k, v=v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask="causal")

        row["sdpa_first"] = _sync_ms(sdpa)
        row["sdpa_rep"] = _median_ms(sdpa, args.reps)
        rows.append(row)
        print("micro " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return rows


def kv_lengths(args) -> list[int]:
    """2048, 2048 + chunk, 4096, 4096 + chunk, ... up to ``--max-kv``."""
    out, base = [], 2048
    while base <= args.max_kv:
        out += [x for x in (base, base + args.chunk) if x <= args.max_kv]
        base *= 2
    return out


# ---- 2. runner ----------------------------------------------------------------------
def _chunks(length: int, chunk: int, first: int | None) -> list[tuple[int, int]]:
    """(start, end) of each chunk; ``first`` = length of chunk 0 if it differs."""
    bounds = [0] + ([first] if first else [])
    while bounds[-1] < length:
        bounds.append(min(length, bounds[-1] + chunk))
    return list(zip(bounds, bounds[1:], strict=False))


def prefill_runner(runner, tokens: list[int], chunk: int, first: int | None) -> list[float]:
    """Per-chunk ms of one prompt through ``ModelRunner.forward``; frees its blocks."""
    from slabserve.engine.runner import SeqInput
    from slabserve.kvcache import blocks_needed

    table: list[int] = []
    times = []
    try:
        for s, e in _chunks(len(tokens), chunk, first):
            need = blocks_needed(e, runner.block_size) - len(table)
            got = runner.allocator.allocate(need) if need > 0 else []
            if got is None:
                raise MemoryError("KV budget too small for the prompt (--kv-gib)")
            table += got
            seq = SeqInput(tokens[s:e], s, table, want_logits=e == len(tokens))
            times.append(_sync_ms(lambda seq=seq: runner.forward([seq], [])[0]))
    finally:
        runner.allocator.free(table)
    return times


def prefill_mlx_lm(model, tokens: list[int], chunk: int) -> list[float]:
    """Per-chunk ms of mlx-lm's own prefill loop (generate_step's: model on a chunk with a
    ``KVCache`` per layer, eval of the cache state, ``mx.clear_cache``; it keeps the last
    token for the first decode step, this includes it)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    times = []
    for s, e in _chunks(len(tokens), chunk, None):
        x = mx.array(tokens[s:e])[None]

        def step(x=x):
            model(x, cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()  # as generate_step does after each prefill chunk
            return []

        times.append(_sync_ms(step))
    return times


def runner_part(args) -> dict:
    """The runner part of the benchmark: chunks through ``ModelRunner.forward``."""
    from slabserve import env
    from slabserve.engine.config import CacheConfig
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner
    from slabserve.mlxmem import configure_memory

    configure_memory(None)
    name, _, dtype = args.embedded.partition(":")
    model, _tok, _ = load(f"embedded:{name}", dtype or "float32", cache_dir=env.cache_dir())
    runner = ModelRunner(model, CacheConfig(block_size=BLOCK, slab_tokens=4096,
                                            kv_budget_bytes=int(args.kv_gib * (1 << 30))))
    vocab = min(model.args.vocab_size, 30_000)
    rng = random.Random(0)
    a = [rng.randrange(vocab) for _ in range(args.prompt)]
    b = [rng.randrange(vocab) for _ in range(args.prompt)]
    c = args.chunk_tokens
    warm = [rng.randrange(vocab) for _ in range(64)]
    prefill_runner(runner, warm, 32, None)  # compile the model's kernels (shapes unused)
    shift = c // 2 + 3 * BLOCK
    out: dict = {"model": args.embedded, "prompt": args.prompt, "chunk": c,
                 "cached_prefix": shift, "runs": {}}
    for tag, bucket in (("off", 0), ("on", args.bucket)):
        old, runner.attention.prefill_bucket = runner.attention.prefill_bucket, bucket
        try:
            for scen, toks, first in (("A cold", a, None), ("A warm", a, None),
                                      ("B shift", b, shift)):
                try:
                    t = prefill_runner(runner, toks, c, first)
                except Exception as e:  # noqa: BLE001  (recorded; the other runs go on)
                    out["runs"][f"{tag} {scen} error"] = f"{type(e).__name__}: {e}"
                    print(f"runner bucket={tag} {scen}: {type(e).__name__}: {e}", flush=True)
                    continue
                out["runs"][f"{tag} {scen}"] = t
                print(f"runner bucket={tag:3s} {scen:8s} total {sum(t):9.1f} ms  chunks "
                      + " ".join(f"{x:.1f}" for x in t), flush=True)
        finally:
            runner.attention.prefill_bucket = old
    if args.mlx_lm:
        for scen in ("cold", "warm"):
            t = prefill_mlx_lm(model, a, c)
            out["runs"][f"mlx-lm A {scen}"] = t
            print(f"runner mlx-lm A {scen:5s} total {sum(t):9.1f} ms  chunks "
                  + " ".join(f"{x:.1f}" for x in t), flush=True)
    return out


# ---- report -------------------------------------------------------------------------
def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def summary(micro: list[dict], run: dict | None, bucket: int) -> list[str]:
    lines = []
    if micro:
        cols = ["off_first", "off_rep", "off_shift", "on_first", "on_rep", "on_shift",
                "sdpa_first", "sdpa_rep"]
        lines += [f"micro: prefill_attention ms, q chunk fixed, bucket {bucket} "
                  "(sdpa = contiguous K/V of length n+1)",
                  "| heads | n | " + " | ".join(cols) + " |",
                  "|---|--:|" + "--:|" * len(cols)]
        nan = float("nan")
        lines += [f"| {r['heads']} | {r['n']} | "
                  + " | ".join(f"{r.get(k, nan):.2f}" for k in cols) + " |" for r in micro]
        lines += [f"{r['heads']} n={r['n']} {k}: {v}" for r in micro for k, v in r.items()
                  if k.endswith("_error")]
    if run:
        lines += ["", f"runner: {run['model']}, {run['prompt']}-token prompt, chunk "
                  f"{run['chunk']}, B's cached prefix {run['cached_prefix']} (its chunk 0)",
                  "| run | chunks | total ms | median chunk ms | max chunk ms |",
                  "|---|--:|--:|--:|--:|"]
        for k, t in run["runs"].items():
            if isinstance(t, str):
                lines.append(f"| {k}: {t} | | | | |")
                continue
            lines.append(f"| {k} | {len(t)} | {sum(t):.1f} | {statistics.median(t):.1f} "
                         f"| {max(t):.1f} |")
    return lines


def parse(argv: list[str]) -> argparse.Namespace:
    gpu = mx.default_device().type == mx.gpu
    ap = argparse.ArgumentParser(prog="slabserve bench prefill-chunks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--chunk", type=int, default=512, help="micro: q tokens per chunk")
    ap.add_argument("--max-kv", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shift", type=int, default=3 * BLOCK,
                    help="micro: tokens less for the 'shift' call")
    ap.add_argument("--bucket", type=int, default=1024, help="tokens, for the 'on' runs")
    ap.add_argument("--embedded", default="qwen2.5-0.5b:bfloat16", help="NAME[:DTYPE]")
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--mlx-lm", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-runner", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("prefill_chunks.json"))
    args = ap.parse_args(argv)
    if args.bucket <= 0 or args.chunk <= 0 or args.chunk_tokens <= 0:
        ap.error("--bucket, --chunk and --chunk-tokens must be positive")
    if args.shift >= 2048 - args.chunk:
        ap.error("--shift must leave the shifted chunk a prefix")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "command": "python -m slabserve.bench.prefill_chunks " + " ".join(argv or sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"device {meta['device']} mlx {meta['mlx']} dtype {args.dtype}", flush=True)
    dtype = getattr(mx, args.dtype)
    micro = [] if args.skip_micro else [
        r for h in HEADS for r in micro_heads(args, h, dtype)]
    run = None if args.skip_runner else runner_part(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "micro": micro, "runner": run}, indent=1))
    print("wrote", args.out)
    print("\n".join(summary(micro, run, args.bucket)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU harness for the native pooled decode kernel (attention/native_cuda.py).

``python -m slabserve.bench.cuda_kernel [--check] [--sweep] [--table] [--layers N] [--out DIR]``

* ``--check``: correctness against a float64 reference (ragged lengths, GQA ratios, head_dim
  64/128, block sizes, one and several slabs, shuffled tables, forced chunk counts).
* ``--sweep``: per-layer time of the native kernel for forced chunk counts (tunes the plan).
* ``--grid``: each launch's device time per grid chunk count and merge form (kernel_grid).
* ``--table``: per-layer time, many layers chained in one graph (eval only, graph built
  first), of native, gather-SDPA, MLX SDPA on contiguous K/V, and the floor = K+V bytes /
  copy bandwidth measured in the same run; 32 q / 8 kv heads, head_dim 64, fp16, block 16.
* ``--int8``: native over a float16 pool against native over the same pages in int8, each
  with its floor (bench/cuda_int8.py).
Results go to stdout (a short table last) and ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from slabserve.attention.cuda_source import STAGES, VARIANTS
from slabserve.attention.gather import GatherSDPA
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.attention.reference import random_case, reference_decode

DT = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
TOL = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def make_case(lengths, hq, hkv, d, bs, dtype, slab_blocks, layers=1, seed=0,
              contiguous=False, max_slabs=None):
    """(pool, batch, q): attention.reference.random_case with slabs of ``slab_blocks``
    blocks, as many as the batch needs, tables shuffled across them (``contiguous``:
    consecutive block ids, what the server's lowest-id-first allocator hands a prompt
    prefilled alone).  ``max_slabs``: the pool's declared capacity, which sets the
    kernel's slab inputs (the server's pools declare 32)."""
    q, pool, batch = random_case(lengths, hq, hkv, d, bs, dtype, slab_blocks=slab_blocks,
                                 layers=layers, seed=seed, contiguous=contiguous,
                                 max_slabs=max_slabs)
    return pool, batch, q


def rel_err(got, want) -> float:
    """Relative L2 error of ``got`` against the float64 reference ``want``."""
    g = np.array(got.astype(mx.float32)).astype(np.float64).reshape(want.shape)
    if not np.all(np.isfinite(g)):
        return float("inf")
    return float(np.linalg.norm(g - want) / np.linalg.norm(want))


def _check_matrix():
    """Every dtype x (head_dim, block) x GQA ratio; slab layout alternates between one slab
    and several (tables shuffled across them); ragged lengths throughout."""
    layouts = ((160, (1, 37, 700, 1500)), (24, (5, 300, 1029)))
    cases, i = [], 0
    for dt in ("f16", "bf16", "f32"):
        for d, bs in ((64, 16), (128, 16), (64, 32), (128, 32)):
            for hq, hkv in ((8, 8), (32, 8), (14, 2)):
                sb, lens = layouts[i % 2]
                cases.append((dt, dt, d, bs, hq, hkv, sb, lens))
                i += 1
    return cases + [
        ("f16", "f32", 128, 64, 32, 8, 64, (3, 999, 4097)),
        ("bf16", "bf16", 64, 64, 64, 4, 16, (2000, 17)),
        ("f32", "f16", 64, 16, 16, 1, 40, (1, 2, 3)),
        ("f16", "f16", 64, 16, 16, 8, 24, (5, 300, 1029)),  # 2 q heads per kv head
        ("bf16", "bf16", 64, 32, 16, 8, 160, (1, 37, 700, 1500)),
    ]


CHECK_MATRIX = _check_matrix()


def tol_for(dt: str, qdt: str) -> float:
    """The coarser tolerance of the pool's and the query's (= output's) dtype."""
    return max(TOL[DT[dt]], TOL[DT[qdt]])


def check(out_rows: list, nat: NativeCUDA, forced=(None, 1, 3, 64), shard=(0, 1)) -> float:
    """Run the matrix (cases ``i`` with ``i % n == k`` for ``shard=(k, n)``); every case
    with the plan's chunks and forced counts.  Returns the worst error / tolerance (< 1)."""
    worst = 0.0
    for i, (dt, qdt, d, bs, hq, hkv, sb, lens) in enumerate(CHECK_MATRIX):
        if i % shard[1] != shard[0]:
            continue
        pool, batch, q = make_case(lens, hq, hkv, d, bs, DT[dt], sb, seed=i)
        q = q.astype(DT[qdt])
        scale = 1.0 / math.sqrt(d)
        reason = nat.decline(q, pool, batch)
        if reason:
            print(f"declined {dt} d{d} bs{bs}: {reason}", flush=True)
            mx.eval(nat._run(q, pool, 0, batch, scale, 2))  # raise the full error
            raise AssertionError(reason)
        want = reference_decode(q, pool, 0, batch, scale)
        errs = []
        for c in forced:
            got = nat(q, pool, 0, batch, scale) if c is None else nat._run(
                q, pool, 0, batch, scale, c)
            errs.append(rel_err(got, want))
        ratio = max(errs) / tol_for(dt, qdt)
        worst = max(worst, ratio)
        row = dict(dtype=dt, q_dtype=qdt, head_dim=d, block=bs, heads=f"{hq}/{hkv}",
                   slabs=pool.num_slabs, lengths=list(lens), max_rel_err=max(errs),
                   tol=tol_for(dt, qdt), variant=nat.variant, ok=ratio < 1)
        out_rows.append(row)
        print(f"{dt:>4} q{qdt:>4} d{d:<3} bs{bs:<2} {hq:>2}/{hkv:<2} slabs {pool.num_slabs:<3} "
              f"lens {str(list(lens)):<22} err {max(errs):.2e} (tol {tol_for(dt, qdt):.0e}) "
              f"{'ok' if ratio < 1 else 'FAIL'}", flush=True)
    return worst


def timed(fn, reps=10, warm=2) -> float:
    """Median seconds of ``mx.eval`` on a graph built by ``fn`` (building not timed)."""
    for _ in range(warm):
        mx.eval(fn())
    mx.synchronize()
    ts = []
    for _ in range(reps):
        y = fn()
        t0 = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Bytes/s of ``x + 1`` over 1 GiB of fp16 (bytes read plus written)."""
    x = mx.random.normal((1 << 29,)).astype(mx.float16)
    mx.eval(x)
    t = timed(lambda: x + 1, reps=10)
    return 2 * x.nbytes / t


def chain(attn, q, layers, calls=None):
    """A graph builder: ``calls`` (default ``layers``) attention calls in a row, call i
    reading layer ``i % layers``."""
    def fn():
        x = q
        for i in range(calls or layers):
            x = attn(x, i % layers)
        return x

    return fn


def per_layer(make, layers: int, repeat: int, reps: int = 10) -> tuple[float, float | None]:
    """(us per layer of a ``layers``-call chain, marginal us per call): ``make(calls)``
    builds the chain; the marginal cost is ``(T(repeat * layers) - T(layers)) / ((repeat -
    1) * layers)``, which drops what an eval costs once (the host work before the first
    graph launch and after the last kernel); None when ``repeat`` is 1."""
    t1 = timed(make(layers), reps=reps)
    if repeat <= 1:
        return t1 / layers * 1e6, None
    tk = timed(make(repeat * layers), reps=reps)
    return t1 / layers * 1e6, (tk - t1) / ((repeat - 1) * layers) * 1e6


def cell(b, ctx, layers, bw, natives, gat, sweep=None, hq=32, hkv=8, d=64, bs=16,
         dt=mx.float16, contiguous=False, max_slabs=None, repeat=1):
    """Per-layer microseconds of each method for one (batch, context) cell; with
    ``repeat`` > 1 also the marginal cost per call (``per_layer``) of the native methods
    and of SDPA on contiguous K/V, as ``*_m_us``."""
    pool, batch, q = make_case([ctx] * b, hq, hkv, d, bs, dt, 4096, layers=layers,
                               contiguous=contiguous, max_slabs=max_slabs)
    scale = 1.0 / math.sqrt(d)
    res = dict(B=b, ctx=ctx, layers=layers, slabs=pool.num_slabs, shape=f"{hq}/{hkv}/{d}",
               dtype=str(dt).split(".")[-1])
    floor_bytes = 2 * b * ctx * hkv * d * dt.size
    res["floor_us"] = floor_bytes / bw * 1e6

    def put(key: str, make) -> None:  # ``key``_us and, with repeat > 1, ``key``_m_us
        res[f"{key}_us"], marg = per_layer(make, layers, repeat)
        if marg is not None:
            res[f"{key}_m_us"] = marg

    for name, nat in natives.items():
        assert nat.decline(q, pool, batch) is None
        for c in sweep or ():
            fn = chain(lambda x, i, c=c, nat=nat: nat._run(x, pool, i, batch, scale, c), q,
                       layers)
            res[f"{name}_c{c}_us"] = timed(fn) / layers * 1e6
        put(name, lambda n, nat=nat: chain(lambda x, i: nat(x, pool, i, batch, scale), q,
                                           layers, n))
    if sweep:
        return res
    res["gather_us"] = timed(chain(lambda x, i: gat(x, pool, i, batch, scale), q, layers),
                             reps=5) / layers * 1e6
    pool = None  # free the pool before the contiguous copies
    put("sdpa_contig", sdpa_contig_chain(q, ctx, layers, hkv, scale))
    return res


def sdpa_contig_chain(q, ctx: int, layers: int, hkv: int, scale: float, distinct: bool = True):
    """The peer: ``make(calls=None)``, which builds a chain of MLX SDPA calls (``layers``
    of them by default) over contiguous random K/V ``[B, hkv, ctx, head_dim]`` in q's
    dtype, one pair per layer (``distinct``) or one pair read by every layer."""
    b, _, _, d = q.shape
    n = layers if distinct else 1
    kv = [mx.random.normal((b, hkv, ctx, d)).astype(q.dtype) for _ in range(2 * n)]
    mx.eval(kv)
    sdpa = mx.fast.scaled_dot_product_attention

    def make(calls=None):
        return chain(lambda x, i: sdpa(x, kv[2 * (i % n)], kv[2 * (i % n) + 1], scale=scale),
                     q, layers, calls)

    return make


def op_overhead(layers: int, repeat: int = 1) -> tuple[float, float | None]:
    """Per-op microseconds of a chain of tiny elementwise ops (the framework's floor), and
    the marginal cost per op (``per_layer``; None when ``repeat`` is 1)."""
    x = mx.random.normal((1, 32, 1, 64)).astype(mx.float16)
    mx.eval(x)
    return per_layer(lambda n: chain(lambda y, i: y * 1.0001, x, layers, n), layers, repeat)


def gpu_name() -> str:
    """The GPU's name from nvidia-smi, or "unknown"."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_natives(spec: str) -> dict:
    """``auto,mma3,lean,async3f,auto3s`` -> {name: NativeCUDA}: a shipped variant
    (cuda_source.VARIANTS), then optionally its ring depth (only the shipped 3, kept so
    that earlier names such as ``auto3`` still work), then optionally ``f`` / ``s``: the
    chunk merge always fused into the main launch / always a separate launch (default: by
    layer size and grid chunks, never for ``mma``: NativeCUDA._plan_params, _fused)."""
    out = {}
    for name in spec.split(","):
        m = re.fullmatch(rf"({'|'.join(VARIANTS)})({STAGES})?([fs]?)", name)
        if m is None:
            raise ValueError(f"bad native name {name!r}: a variant of {VARIANTS}, then "
                             f"optionally {STAGES} and f or s")
        variant, _, fused = m.groups()
        out[name] = NativeCUDA(variant=variant, fused_merge={"f": True, "s": False}.get(fused))
    return out


def parse_shape(spec: str) -> dict:
    """``32/8/64/f16`` -> cell keyword arguments (q heads, kv heads, head_dim, dtype)."""
    hq, hkv, d, dt = spec.split("/")
    return dict(hq=int(hq), hkv=int(hkv), d=int(d), dt=DT[dt])


def table(cells, layers, natives, sweep=None, shape="32/8/64/f16", contiguous=False,
          max_slabs=None, repeat=1) -> list:
    """Rows of ``cell`` for every (batch, context) in ``cells`` at one head shape, printed
    as JSON lines as they come, after a header with the copy bandwidth and op overhead."""
    bw = max(copy_bandwidth(), torch_copy_bandwidth())
    ovh, ovh_m = op_overhead(layers, repeat)
    marg = "" if ovh_m is None else f" ({ovh_m:.1f} marginal, {repeat}x chains)"
    print(f"# {gpu_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; {layers} layers chained; "
          f"tiny-op overhead {ovh:.1f} us{marg}", flush=True)
    gat = GatherSDPA()
    rows = []
    for b, ctx in cells:
        r = cell(b, ctx, layers, bw, natives, gat, sweep=sweep, contiguous=contiguous,
                 max_slabs=max_slabs, repeat=repeat, **parse_shape(shape))
        r["tables"] = "contiguous" if contiguous else "shuffled"
        r["max_slabs"] = max_slabs
        r["bw_TBps"] = bw / 1e12
        r["op_overhead_us"] = ovh
        rows.append(r)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)
        mx.clear_cache()
    return rows


def torch_copy_bandwidth() -> float:
    """Device-to-device copy through PyTorch (bytes read plus written), 0 without it."""
    try:
        import torch
    except ImportError:
        return 0.0
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(ts)


def cuda_args(ap: argparse.ArgumentParser, argv) -> argparse.Namespace | None:
    """The parsed arguments, or None (saying why) where MLX has no CUDA device."""
    a = ap.parse_args(argv)
    if not mx.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return None
    return a


def int_cells(spec: str) -> list[tuple[int, ...]]:
    """``8:4096,16:1024`` -> [(8, 4096), (16, 1024)] (any number of fields per cell)."""
    return [tuple(int(x) for x in cell.split(":")) for cell in spec.split(",") if cell]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slabserve bench cuda-kernel",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--grid", action="store_true", help="device time per launch (kernel_grid)")
    ap.add_argument("--int8", action="store_true", help="float16 vs int8 native (cuda_int8)")
    ap.add_argument("--int8-extra", default="",
                    help="int8: also these forms, comma-separated: st<n> ring depth, c<n> "
                    "chunks, s / f merge split / fused, combinable (c16s); cuda_int8.parse_extra")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1,
                    help="table: also chains of this many times --layers calls (cycling over "
                    "the layers), for the marginal cost per layer")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--ctxs", default="1024,4096,16384,32768")
    ap.add_argument("--natives", default="auto",
                    help="comma-separated: auto, mma, lean, async (make_natives)")
    ap.add_argument("--shapes", default="32/8/64/f16",
                    help="table shapes q/kv/head_dim/dtype, comma-separated")
    ap.add_argument("--shard", default="0/1", help="k/n: run check cases i %% n == k")
    ap.add_argument("--max-slabs", type=int, default=None,
                    help="the pool's declared slab capacity (sets the kernel's slab inputs; "
                    "the server declares 32); default: none")
    ap.add_argument("--contiguous", action="store_true",
                    help="tables of consecutive blocks (default: shuffled over all slabs)")
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None) -> int:
    """Run the steps asked for; 1 where MLX has no CUDA device."""
    a = cuda_args(_parser(), argv)
    if a is None:
        return 1
    out = Path(a.out) if a.out else None
    result: dict = {"gpu": gpu_name()}
    if a.check:
        rows: list = []
        result["check_worst_over_tol"] = max(
            check(rows, nat, shard=tuple(int(x) for x in a.shard.split("/")))
            for nat in make_natives(a.natives).values())
        result["check"] = rows
        print(f"check: worst error / tolerance = {result['check_worst_over_tol']:.3f}")
    cells = [(int(b), int(c)) for b in a.batches.split(",") for c in a.ctxs.split(",")]
    if a.sweep:
        sw = [1, 2, 4, 8, 16, 32, 64]
        result["sweep"] = {shape: table(cells, a.layers, make_natives(a.natives), sweep=sw,
                                        shape=shape) for shape in a.shapes.split(",")}
    if a.grid:
        from slabserve.bench.kernel_grid import run_grid

        result["grid"] = run_grid(cells, a.shapes.split(","))
    if a.table:
        natives = make_natives(a.natives)
        result["table"] = {}
        for shape in a.shapes.split(","):
            result["table"][shape] = table(cells, a.layers, natives, shape=shape,
                                           contiguous=a.contiguous, max_slabs=a.max_slabs,
                                           repeat=a.repeat)
        from slabserve.bench.cuda_tables import print_table

        for rows in result["table"].values():
            for name in natives:
                print_table(rows, name)
    if a.int8:
        from slabserve.bench.cuda_int8 import int8_table
        from slabserve.bench.cuda_tables import print_int8_table

        bw = max(copy_bandwidth(), torch_copy_bandwidth())
        print(f"# {gpu_name()}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
        extras = tuple(x for x in a.int8_extra.split(",") if x)
        result["int8"] = int8_table(cells, a.layers, a.repeat, bw, extras)
        print_int8_table(result["int8"], extras)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cuda_kernel.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

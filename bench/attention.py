"""``slabserve bench attention``: gather-SDPA vs the native pooled decode, per cell.

Cells: geometry (q/kv/head_dim) x K/V dtype (float32, float16, bfloat16, int8: q float16
for int8, its pages quantized from float16 ones) x batch x context x slabs ("one": the whole
pool is one slab; "many": the pool is 8 slabs), block tables shuffled across the pool,
every sequence at the full context.  Each path is timed as ``--layers`` decode layers
chained in one graph (cycling over as many distinct pool layers as fit ``--mem-gb``),
one ``mx.eval`` per repetition, minimum of ``--reps``; reported per layer.

Columns: gather ms, native ms (or its decline reason), MLX SDPA on K/V that are already
contiguous (``--contiguous``, the attention cost without paging), the floor (K+V bytes
read once / copy bandwidth measured in this run), the selector's choice (profile if
this device has one, else rules) and its regret = time(choice) / time(faster path).

Outputs under ``--out``: ``<backend>.json``, ``<backend>.md`` (tables), ``<backend>.png``
(if matplotlib is installed).  Works on CPU and on CUDA/Metal GPUs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from slabserve.attention.base import DecodeBatch
from slabserve.attention.calibrate import build_case, time_chain, time_paths
from slabserve.attention.gather import GatherSDPA, length_mask
from slabserve.attention.profile import device_id, load_for_device
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import current_backend, make_key
from slabserve.kvcache.pool import PoolGeometry, SlabPool


@dataclass(frozen=True)
class Cell:
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    batch: int
    ctx: int
    slabs: str  # "one" | "many"

    @property
    def name(self) -> str:
        return (f"{self.q_heads}/{self.kv_heads}/{self.head_dim} {self.dtype} "
                f"B{self.batch} ctx{self.ctx} {self.slabs}")

    def kv_bytes(self, block_size: int) -> int:
        """K+V bytes one layer reads (whole blocks; an int8 pool's scales included)."""
        nblk = -(-self.ctx // block_size)
        geom = PoolGeometry(1, self.kv_heads, self.head_dim, block_size, 1,
                            getattr(mx, self.dtype))
        return 2 * self.batch * nblk * block_size * self.kv_heads * geom.token_head_bytes


@dataclass
class Result:
    cell: Cell
    pool_layers: int
    gather_ms: float
    native_ms: float | None
    native_decline: str | None
    contiguous_ms: float | None
    floor_ms: float
    choice: str
    reason: str
    regret: float | None
    rule_choice: str
    rule_regret: float | None
    max_abs_diff: float | None


# ---- set-up ---------------------------------------------------------------------------
def build(cell: Cell, block_size: int, pool_layers: int, seed: int = 0):
    """(q, pool, batch) for a cell: random pages, shuffled tables."""
    return build_case(cell.q_heads, cell.kv_heads, cell.head_dim, cell.dtype, cell.batch,
                      cell.ctx, cell.slabs, block_size, pool_layers, seed)


def copy_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Bytes per second of ``y = x + 1`` (read + written) on the default device."""
    x = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(x + 1)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def contiguous_fn(q, pool: SlabPool, batch: DecodeBatch, scale: float):
    """SDPA over K/V gathered once beforehand (untimed): attention without paging."""
    from slabserve.attention.gather import gather_kv

    kv = [gather_kv(pool, layer, batch, q.dtype) for layer in range(pool.geom.num_layers)]
    mx.eval(kv)
    mask = length_mask(batch, kv[0][0].shape[2])
    return lambda x, layer: mx.fast.scaled_dot_product_attention(
        x, kv[layer][0], kv[layer][1], scale=scale, mask=mask)


# ---- one cell -------------------------------------------------------------------------
def run_cell(cell: Cell, args, selector: Selector, bandwidth: float) -> Result:
    per_layer = cell.kv_bytes(args.block_size) * (2 if args.contiguous else 1)
    pool_layers = max(1, min(args.layers, int(args.mem_gb * 2**30) // max(per_layer, 1)))
    q, pool, batch = build(cell, args.block_size, pool_layers)
    scale = cell.head_dim ** -0.5
    gather = GatherSDPA()
    key = make_key(q, pool, batch, current_backend())
    native = selector.native(key.backend)
    why = native.decline(q, pool, batch)
    fns = {"gather": lambda x, layer: gather(x, pool, layer, batch, scale)}
    if why is None:
        fns["native"] = lambda x, layer: native(x, pool, layer, batch, scale)
    if args.contiguous:
        fns["contiguous"] = contiguous_fn(q, pool, batch, scale)
    t = time_paths(fns, q, args.layers, pool_layers, args.reps)
    t_gather, t_native, t_contig = t["gather"], t.get("native"), t.get("contiguous")
    diff = None
    if why is None:
        a = native(q, pool, 0, batch, scale).astype(mx.float32)
        b = gather(q, pool, 0, batch, scale).astype(mx.float32)
        diff = mx.abs(a - b).max().item()
    times = {"gather": t_gather, "native": t_native}
    best = min(t for t in times.values() if t is not None)

    def regret(d) -> float | None:
        chosen = times[d.path.value]
        return None if chosen is None else chosen / best

    decision = selector.fresh(q, pool, batch, key)
    rules = Selector(natives={key.backend: native}).fresh(q, pool, batch, key)
    floor = cell.kv_bytes(args.block_size) / bandwidth * 1e3
    return Result(cell, pool_layers, t_gather, t_native, None if why is None else str(why),
                  t_contig, floor, decision.path.value, decision.label[1], regret(decision),
                  rules.path.value, regret(rules), diff)


# ---- decision cost ----------------------------------------------------------------------
def decision_cost(args, selector: Selector) -> dict:
    """Steady-state selector cost per layer-step (a new DecodeBatch every step, as the
    runner makes), against attention time at B=1, ctx 1k in the same run."""
    g = args.geometries[0]
    cell = Cell(*g, args.dtypes[0], 1, 1024, "one")
    q, pool, batch = build(cell, args.block_size, 1)
    layers, steps = 16, args.decision_steps
    for layer in range(layers):  # warm the per-layer cache
        selector.decide(q, pool, layer, batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = DecodeBatch(batch.geom, batch.tables, batch.lengths)
        for layer in range(layers):
            selector.decide(q, pool, layer, b)
    per = (time.perf_counter() - t0) / (steps * layers) * 1e6
    scale = cell.head_dim ** -0.5
    t_attn = time_chain(lambda x, layer: selector.run(x, pool, 0, batch, scale),
                        q, args.layers, 1, args.reps)
    return {"cell": cell.name, "decide_us_per_layer_step": per,
            "attention_ms_per_layer": t_attn,
            "fraction_of_attention": per * 1e-3 / t_attn}


# ---- output ---------------------------------------------------------------------------
def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[Result]) -> str:
    head = ("| cell | pool layers | gather ms | native ms | contiguous SDPA ms | floor ms "
            "| gather/native | choice | reason | regret | rules' choice | rules' regret "
            "| max abs diff |\n|---|--:|--:|--:|--:|--:|--:|---|---|--:|---|--:|--:|\n")
    rows = []
    for r in results:
        native = (fmt(r.native_ms, ".3f") if r.native_decline is None
                  else f"declined: {r.native_decline}")
        speed = None if r.native_ms is None else r.gather_ms / r.native_ms
        rows.append(f"| {r.cell.name} | {r.pool_layers} | {r.gather_ms:.3f} | {native} "
                    f"| {fmt(r.contiguous_ms, '.3f')} | {r.floor_ms:.4f} | {fmt(speed)} "
                    f"| {r.choice} | {r.reason} | {fmt(r.regret, '.3f')} | {r.rule_choice} "
                    f"| {fmt(r.rule_regret, '.3f')} | {fmt(r.max_abs_diff, '.1e')} |")
    return head + "\n".join(rows) + "\n"


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results if r.native_ms is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r.gather_ms / r.native_ms for r in rows],
           color=["tab:green" if r.gather_ms > r.native_ms else "tab:red" for r in rows])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [r.cell.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("gather ms / native ms (>1: native faster)")
    ax.set_title(f"decode attention per layer, {device_id()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(results: list[Result], cost: dict | None, meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / meta["backend"]
    body = {"meta": meta, "decision_cost": cost,
            "results": [dict(asdict(r), cell=asdict(r.cell), name=r.cell.name)
                        for r in results]}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(body, indent=1))
    md = [f"# decode attention, {meta['device']}\n", f"`{meta['command']}`\n",
          f"mlx {meta['mlx']}, {meta['layers']} layers chained per eval, min of "
          f"{meta['reps']}, block {meta['block_size']}, copy bandwidth "
          f"{meta['copy_GBps']:.1f} GB/s, profile: {meta['profile']}\n", table(results)]
    if meta.get("skipped"):
        md.append("Skipped (over --max-tokens): " + ", ".join(meta["skipped"]) + "\n")
    if cost:
        md.append(f"Decision cost: {cost['decide_us_per_layer_step']:.2f} us per layer-step "
                  f"= {100 * cost['fraction_of_attention']:.3f}% of attention "
                  f"({cost['attention_ms_per_layer']:.3f} ms per layer, {cost['cell']}).\n")
    paths[1].write_text("\n".join(md))
    if plot(results, stem.with_suffix(".png")):
        paths.append(stem.with_suffix(".png"))
    return paths


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slabserve bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--geometries", default="32/8/64,14/2/64",
                   help="q_heads/kv_heads/head_dim, comma separated")
    p.add_argument("--dtypes", default="float16,float32")
    p.add_argument("--batches", type=ints, default=[1, 4, 8, 16])
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384])
    p.add_argument("--slabs", default="one,many")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=None,
                   help="layers chained per eval (default 16 on GPU, 2 on CPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mem-gb", type=float, default=None,
                   help="pool memory per cell (default 24 on GPU, 3 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="skip cells with batch x ctx above this (default: none on GPU, "
                        "32768 on CPU)")
    p.add_argument("--contiguous", action=argparse.BooleanOptionalAction, default=None,
                   help="also time SDPA on contiguous K/V (default on for GPU)")
    p.add_argument("--decision-cost", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decision-steps", type=int, default=2000)
    p.add_argument("--bandwidth-mb", type=int, default=256, help="copy-bandwidth buffer")
    p.add_argument("--no-profile", action="store_true",
                   help="ignore this device's calibration profile (rules only)")
    p.add_argument("--out", type=Path, default=Path("out/attention"))
    args = p.parse_args(argv)
    gpu = current_backend() != "cpu"
    args.geometries = [tuple(int(x) for x in g.split("/")) for g in args.geometries.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.slabs = args.slabs.split(",")
    args.layers = args.layers or (16 if gpu else 2)
    args.mem_gb = args.mem_gb or (24.0 if gpu else 3.0)
    args.max_tokens = args.max_tokens or (1 << 62 if gpu else 32768)
    args.contiguous = gpu if args.contiguous is None else args.contiguous
    return args


def cells(args) -> list[Cell]:
    return [Cell(*g, dt, b, c, s) for g in args.geometries for dt in args.dtypes
            for b in args.batches for c in args.contexts for s in args.slabs]


def main(argv: list[str]) -> int:
    args = parse(argv)
    from slabserve import env

    if current_backend() == "cpu":
        mx.set_cache_limit(8 << 30)  # MLX's 32 MiB default re-faults big intermediates
    profile = None if args.no_profile else load_for_device(env.cache_dir())
    selector = Selector(override=None, profile=profile)
    bandwidth = copy_bandwidth(args.bandwidth_mb << 20)
    meta = {"device": device_id(), "backend": current_backend(), "mlx": mx.__version__,
            "python": platform.python_version(), "layers": args.layers, "reps": args.reps,
            "block_size": args.block_size, "copy_GBps": bandwidth / 1e9,
            "profile": "none" if profile is None else profile.device,
            "command": "slabserve bench attention " + " ".join(argv), "skipped": []}
    results = []
    for cell in cells(args):
        if cell.batch * cell.ctx > args.max_tokens:
            meta["skipped"].append(cell.name)
            continue
        r = run_cell(cell, args, selector, bandwidth)
        results.append(r)
        print(f"{cell.name:40s} gather {r.gather_ms:9.3f}  native {fmt(r.native_ms, '9.3f')}"
              f"  contig {fmt(r.contiguous_ms, '8.3f')}  floor {r.floor_ms:8.4f}  "
              f"{r.choice:6s} regret {fmt(r.regret, '.3f')}", flush=True)
    cost = decision_cost(args, selector) if args.decision_cost else None
    for path in write(results, cost, meta, args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

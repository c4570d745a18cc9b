"""``slabserve bench decode-step``: one full decode step as the server runs it, per path.

``python -m slabserve.bench.decode_step`` (or ``slabserve bench decode-step``).  For an embedded
model (``--embedded NAME[:DTYPE]``), each batch ``B`` in ``--batches`` and context in
``--contexts``: ``B`` sequences with ``ctx`` cached tokens each decode one token per step
through ``engine.executor.ModelExecutor.execute`` (what the scheduler's engine thread
calls): per-sequence ``ScheduledChunk`` planning (block tables, a new block when a
sequence crosses a block boundary), ``ModelRunner.forward`` (DecodeBatch, every layer,
K/V writes, LM head) and greedy sampling, synchronised by the sampled token ids.

Paths: ``native`` and ``gather`` are forced with ``Selector(override=True/False)``;
``auto`` is ``Selector(override=None)`` with this device's calibration profile (if any),
i.e. what the server picks without an environment override.  Which path each selector
actually ran (native may decline) is recorded from its ``path_counts()``.

Fast fill: instead of prefilling ``B x ctx`` tokens, each sequence's blocks come from the
runner's real ``BlockAllocator`` and every slab those blocks live in is overwritten, for
every layer and side, by ``mx.random.normal`` in the pool dtype (never zeros); decoding
then starts at position ``ctx``.  Paths are interleaved step by step (order rotated each
round) so a load change on a shared machine hits them alike; every path decodes the same
positions ``ctx, ctx + 1, ...`` (each overwrites that position's K/V before reading it).

Reports per cell and path: ms/step median and p90 over ``--steps`` after ``--warmup``,
the forward's share (``runner.forward``), tokens/s = B / median step, gather/native.
Cells whose pool + transient gather buffers do not fit ``--mem-gb`` are skipped with the
reason.  Markdown on stdout (short table last), JSON and markdown under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

PATHS = ("native", "gather", "auto")
OVERRIDES = {"native": True, "gather": False, "auto": None}
DEFAULT_OUT = Path("out/decode-step")


# ---- configuration ---------------------------------------------------------------------
def parse_tokens(s: str) -> int:
    """``"4k"`` -> 4096, ``"256"`` -> 256."""
    s = s.strip().lower()
    n = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    if n <= 0:
        raise ValueError(f"context must be positive: {s!r}")
    return n


def parse_model(spec: str) -> tuple[str, str]:
    """``NAME[:DTYPE]`` -> (name, dtype); dtype defaults to float32."""
    from slabserve.engine.embedded import SHAPES

    name, _, dtype = spec.partition(":")
    dtype = dtype or "float32"
    if name not in SHAPES:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(SHAPES)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    return name, dtype


@dataclass(frozen=True)
class BenchConfig:
    """One run.  ``mem_bytes`` bounds weights + pool + one layer's transient gather."""

    model: str = "tiny"
    dtype: str = "float32"
    batches: tuple[int, ...] = (1, 4, 8, 16)
    contexts: tuple[int, ...] = (1024, 4096, 16384, 32768)
    paths: tuple[str, ...] = PATHS
    steps: int = 20
    warmup: int = 3
    mem_bytes: int = 1 << 30
    block_size: int = 16
    slab_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("steps >= 1 and warmup >= 0 required")
        if not self.paths or any(p not in PATHS for p in self.paths):
            raise ValueError(f"paths must be among {PATHS}")
        if min(self.batches) < 1 or min(self.contexts) < 1 or self.mem_bytes <= 0:
            raise ValueError("batches, contexts and mem_bytes must be positive")

    @property
    def rounds(self) -> int:
        return self.warmup + self.steps


def free_memory_bytes() -> int:
    """Free memory of the default device: MemAvailable (capped by a cgroup limit) on the
    CPU, the device's free (or total - MLX active) memory on a GPU."""
    from slabserve.mlxmem import host_memory_bytes

    if mx.default_device().type == mx.cpu:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except OSError:
            pass
        return min(avail, host_memory_bytes())
    info = mx.device_info()
    if isinstance(info.get("free_memory"), int):
        return info["free_memory"]
    total = info.get("total_memory") or info.get("memory_size") or mx.get_memory_limit()
    return int(total) - mx.get_active_memory()


# ---- model and fill --------------------------------------------------------------------
def load_runner(cfg: BenchConfig, runner_cfg=None):
    """(runner, executor, weight bytes) for the embedded model, the pool capped at what
    ``mem_bytes`` leaves after the weights; ``runner_cfg``: a ``RunnerConfig`` (default
    the runner's)."""
    from mlx.utils import tree_flatten

    from slabserve import env
    from slabserve.engine.config import CacheConfig
    from slabserve.engine.executor import ModelExecutor
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner
    from slabserve.mlxmem import configure_memory

    configure_memory(None)
    model, _tok, _path = load(f"embedded:{cfg.model}", cfg.dtype, cache_dir=env.cache_dir())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    budget = max(cfg.mem_bytes - weights, 1)
    cache = CacheConfig(cfg.block_size, cfg.slab_tokens, budget)
    runner = ModelRunner(model, cache, runner_cfg)
    return runner, ModelExecutor(runner, 1 << 30), weights


def transient_bytes(geom, batch: int, ctx: int) -> int:
    """Gather-SDPA's per-layer intermediates: K and V gathered, then transposed copies."""
    nblk = -(-ctx // geom.block_size)
    per_side = batch * nblk * geom.block_size * geom.kv_heads * geom.head_dim * geom.dtype.size
    return 4 * per_side


def cell_fits(runner, cfg: BenchConfig, weights: int, batch: int, ctx: int) -> str | None:
    """Why a cell cannot run within the budget, or None."""
    from slabserve.kvcache import blocks_needed

    g = runner.geom
    need = batch * blocks_needed(ctx + cfg.rounds, g.block_size)
    if need > runner.allocator.num_available:
        return (f"needs {need} blocks ({need * g.block_bytes / 2**30:.2f} GiB of KV), "
                f"{runner.allocator.num_available} available in --mem-gb")
    slabs = max(runner.pool.num_slabs, -(-need // g.slab_blocks))
    total = weights + slabs * g.slab_bytes + transient_bytes(g, batch, ctx)
    if total > cfg.mem_bytes:
        return f"needs {total / 2**30:.2f} GiB with gather's buffers > --mem-gb"
    return None


def fast_fill(runner, batch: int, ctx: int, seed: int) -> list[list[int]]:
    """Allocate each sequence's blocks for positions ``[0, ctx]`` through the runner's
    allocator and overwrite every slab they touch, all layers, K and V, with random
    normal values in the pool dtype.  Returns the block tables."""
    from slabserve.kvcache import blocks_needed

    g = runner.geom
    need = blocks_needed(ctx + 1, g.block_size)
    tables = []
    for _ in range(batch):
        got = runner.allocator.allocate(need)
        if got is None:
            raise RuntimeError("allocator refused blocks cell_fits said were available")
        tables.append(got)
    slabs = sorted({b // g.slab_blocks for t in tables for b in t})
    shape = (g.slab_blocks * g.kv_heads * g.block_size, g.head_dim)
    key = mx.random.key(seed)
    pool = runner.pool
    pool.take_pending()
    for layer in range(g.num_layers):
        new = []
        for side in (pool.k[layer], pool.v[layer]):
            for s in slabs:
                key, sub = mx.random.split(key)
                side[s] = mx.random.normal(shape, dtype=g.dtype, key=sub)
                new.append(side[s])
        mx.eval(new)
    return tables


# ---- timing ----------------------------------------------------------------------------
def plan_step(runner, tables, tokens, pos: int, step: int, params):
    """The scheduler's part of a step: grow tables to cover ``pos``, one chunk each."""
    from slabserve.engine.step import ScheduledChunk, StepPlan
    from slabserve.kvcache import blocks_needed

    need = blocks_needed(pos + 1, runner.block_size)
    for t in tables:
        if len(t) < need:
            t.extend(runner.allocator.allocate(need - len(t)))
    chunks = tuple(ScheduledChunk(f"s{b}", (tokens[b],), pos, tuple(t), True, params,
                                  output_index=step) for b, t in enumerate(tables))
    return StepPlan(step, decodes=chunks)


def run_cell(runner, executor, cfg: BenchConfig, selectors: dict, batch: int, ctx: int):
    """Fill, decode ``cfg.rounds`` interleaved rounds per path, release; one result dict."""
    from slabserve.scheduler.api import SamplingParams

    free0 = runner.allocator.num_free
    tables = fast_fill(runner, batch, ctx, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vocab = runner.model.args.vocab_size
    start = [int(x) for x in rng.integers(0, vocab, batch)]
    tokens = {p: list(start) for p in cfg.paths}
    first: dict[str, list[int]] = {}
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in cfg.paths}
    before = {p: selectors[p].path_counts() for p in cfg.paths}
    params = SamplingParams(max_tokens=cfg.rounds + 1, temperature=0.0, ignore_eos=True)
    old = runner.attention.selector
    try:
        for r in range(cfg.rounds):
            k = r % len(cfg.paths)
            for p in cfg.paths[k:] + cfg.paths[:k]:
                runner.attention.selector = selectors[p]
                t0 = time.perf_counter()
                plan = plan_step(runner, tables, tokens[p], ctx + r, r, params)
                out = executor.execute(plan)
                dt = time.perf_counter() - t0
                tokens[p] = [out.sampled[c.request_id].token_id for c in plan.decodes]
                first.setdefault(p, list(tokens[p]))
                if r >= cfg.warmup:
                    times[p].append((dt, executor.last_forward_s))
    finally:
        runner.attention.selector = old
        for t in tables:
            runner.allocator.free(t)
    runner.allocator.check_integrity()
    paths = {p: _summary(batch, times[p], selectors[p].path_counts(), before[p], first[p])
             for p in cfg.paths}
    for p, r in paths.items():  # a forced native that declined ran gather: say so
        r["as_forced"] = p == "auto" or all(k.startswith(p + ":") for k in r["used"])
    ratio = _ratio(paths, "gather", "native")
    if not paths.get("native", {}).get("as_forced", True):
        ratio = None
    return dict(batch=batch, ctx=ctx, skipped=None, paths=paths,
                free_blocks_before=free0, free_blocks_after=runner.allocator.num_free,
                gather_over_native=ratio)


def _summary(batch: int, times, after: dict, before: dict, first: list[int]) -> dict:
    step = np.array([t for t, _ in times]) * 1e3
    fwd = np.array([f for _, f in times]) * 1e3
    used = {f"{k[0]}:{k[1]}": n - before.get(k, 0) for k, n in after.items()
            if n - before.get(k, 0) > 0}
    med = float(np.median(step))
    return dict(median_ms=med, p90_ms=float(np.percentile(step, 90)),
                forward_median_ms=float(np.median(fwd)), tok_s=batch / med * 1e3,
                steps_ms=[float(x) for x in step], used=used, first_tokens=first)


def _ratio(paths: dict, a: str, b: str) -> float | None:
    if a in paths and b in paths:
        return paths[a]["median_ms"] / paths[b]["median_ms"]
    return None


def used_label(res: dict) -> str:
    """The (path:reason) labels a selector ran in a cell, most used first."""
    used = sorted(res["used"].items(), key=lambda kv: -kv[1])
    return ", ".join(k for k, _ in used)


# ---- driver ----------------------------------------------------------------------------
def run(cfg: BenchConfig, runner, executor, weights: int = 0, log=print) -> list[dict]:
    """Every cell (ascending batch, then context); skipped cells carry the reason.
    ``weights``: bytes of the model's weights (counted against ``cfg.mem_bytes``)."""
    from slabserve import env
    from slabserve.attention.profile import load_for_device
    from slabserve.attention.selector import Selector

    profile = load_for_device(env.cache_dir())
    selectors = {p: Selector(OVERRIDES[p], profile if p == "auto" else None)
                 for p in cfg.paths}
    cells = []
    for b in sorted(cfg.batches):
        for ctx in sorted(cfg.contexts):
            why = cell_fits(runner, cfg, weights, b, ctx)
            if why is not None:
                log(f"skip B={b} ctx={ctx}: {why}")
                cells.append(dict(batch=b, ctx=ctx, skipped=why, paths={}))
                continue
            cells.append(run_cell(runner, executor, cfg, selectors, b, ctx))
            log(_cell_line(cells[-1]))
    return cells


def _cell_line(c: dict) -> str:
    parts = [f"{p} {r['median_ms']:.2f} ms" for p, r in c["paths"].items()]
    return f"B={c['batch']} ctx={c['ctx']}: " + ", ".join(parts)


def tables(cells: list[dict], paths: tuple[str, ...]) -> tuple[str, str]:
    """(full table, short table) in markdown."""
    full = ["| B | ctx | path | ran | median ms | p90 ms | forward ms | tok/s |",
            "|--:|--:|---|---|--:|--:|--:|--:|"]
    short = ["| B | ctx | " + " | ".join(f"{p} ms" for p in paths)
             + " | auto ran | gather/native |", "|--:|--:|" + "--:|" * len(paths) + "---|--:|"]
    for c in cells:
        if c["skipped"]:
            short.append(f"| {c['batch']} | {c['ctx']} | skipped: {c['skipped']} |")
            continue
        for p, r in c["paths"].items():
            full.append(f"| {c['batch']} | {c['ctx']} | {p} | {used_label(r)} | "
                        f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                        f"{r['forward_median_ms']:.2f} | {r['tok_s']:.1f} |")
        ms = " | ".join(_short_ms(c["paths"][p]) for p in paths)
        auto = used_label(c["paths"]["auto"]) if "auto" in c["paths"] else "-"
        ratio = c["gather_over_native"]
        short.append(f"| {c['batch']} | {c['ctx']} | {ms} | {auto} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(full), "\n".join(short)


def _short_ms(r: dict) -> str:
    ms = f"{r['median_ms']:.2f}"
    return ms if r["as_forced"] else f"{ms} (ran {used_label(r).split(':')[0]})"


def machine() -> dict:
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    return dict(device=str(mx.default_device()), device_info=info, mlx=mx.__version__,
                python=platform.python_version(), host=platform.node(),
                cpus=os.cpu_count(), platform=platform.platform())


def add_grid_args(ap: argparse.ArgumentParser, batches: str, contexts: str,
                  slab_tokens: int, mem_help: str) -> None:
    """The model and batch x context grid arguments this benchmark shares with
    ``bench decode-phases``; ``grid_config`` reads them back."""
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16", help="NAME[:DTYPE]")
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--contexts", default=contexts)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mem-gb", type=float, default=None,
                    help=f"{mem_help} (default: 60%% of free memory)")
    ap.add_argument("--slab-tokens", type=int, default=slab_tokens)


def grid_config(a: argparse.Namespace, paths: tuple[str, ...], block_size: int = 16,
                seed: int = 0) -> BenchConfig:
    """The ``BenchConfig`` of ``add_grid_args``'s parsed arguments."""
    name, dtype = parse_model(a.embedded)
    mem = int(a.mem_gb * 2**30) if a.mem_gb is not None else int(0.6 * free_memory_bytes())
    return BenchConfig(name, dtype, tuple(int(x) for x in a.batches.split(",")),
                       tuple(parse_tokens(x) for x in a.contexts.split(",")), paths,
                       a.steps, a.warmup, mem, block_size, a.slab_tokens, seed)


def parse_args(argv: list[str]) -> tuple[BenchConfig, Path]:
    ap = argparse.ArgumentParser(prog="slabserve bench decode-step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(ap, "1,4,8,16", "1k,4k,16k,32k", 4096, "weights + KV + gather buffers")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    return grid_config(a, tuple(a.paths.split(",")), a.block_size, a.seed), a.out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, out = parse_args(argv)
    runner, executor, weights = load_runner(cfg)
    g = runner.geom
    heads = runner.model.args.num_attention_heads
    print(f"model {cfg.model} {cfg.dtype}: {g.num_layers} layers, {heads}/{g.kv_heads}/"
          f"{g.head_dim} heads, block {g.block_size}, slab {cfg.slab_tokens} tokens, "
          f"budget {cfg.mem_bytes / 2**30:.1f} GiB; {mx.default_device()}", flush=True)
    cells = run(cfg, runner, executor, weights, log=lambda s: print(s, flush=True))
    full, short = tables(cells, cfg.paths)
    from slabserve.attention.selector_rules import current_backend

    stem = f"{current_backend()}-{cfg.model}-{cfg.dtype}"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["slabserve bench decode-step", *argv])
    meta = dict(config=asdict(cfg), machine=machine(), command=command,
                geometry=dict(layers=g.num_layers, q_heads=heads, kv_heads=g.kv_heads,
                              head_dim=g.head_dim, block_size=g.block_size))
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, cells=cells), indent=1))
    (out / f"{stem}.md").write_text(f"{full}\n\n{short}\n")
    print(f"\n{full}\n\nwrote {out / stem}.json\n\n{short}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``slabserve calibrate``: time gather-SDPA and the native pooled path on this device over
a grid of (batch, context, slabs) for a model's attention geometry, and write the
profile (attention/profile.py) that the selector loads.

    slabserve calibrate [--model embedded:llama-3.2-1b | DIR] [--dtype float16]
                        [--batches 1,4,8,16] [--contexts 1024,4096,16384] [--short]

Entries measured before for other geometries or points are kept; a point measured
again is replaced.  ``calibrate_geometry(..., short=True)`` is what
``slabserve serve --calibrate`` runs at start-up (a few seconds on a GPU).
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx

from slabserve.attention.gather import GatherSDPA
from slabserve.attention.profile import (
    Profile,
    ProfileEntry,
    device_id,
    load_for_device,
    profile_path,
)
from slabserve.attention.reference import random_case
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import current_backend, make_key
from slabserve.kvcache.pool import PoolGeometry

MANY_SLABS = 8
SHORT = {"batches": [1, 8], "contexts": [1024, 4096], "slabs": ["one", "many"]}


def build_case(q_heads: int, kv_heads: int, head_dim: int, dtype: str, batch: int,
               ctx: int, slabs: str, block_size: int = 16, pool_layers: int = 1,
               seed: int = 0):
    """(q, pool, batch) with random pages (reference.random_case): ``slabs`` "one" (one
    slab holds everything) or "many" (MANY_SLABS slabs), tables shuffled across the pool,
    every sequence at ``ctx``."""
    return random_case([ctx] * batch, q_heads, kv_heads, head_dim, block_size,
                       getattr(mx, dtype), slabs=1 if slabs == "one" else MANY_SLABS,
                       layers=pool_layers, seed=seed)


def chain(fn, q, layers: int, pool_layers: int):
    """``layers`` calls of ``fn(x, layer)`` chained through their outputs (one graph)."""
    x = q
    for layer in range(layers):
        x = x + fn(x, layer % pool_layers) * 0.01
    return x


def time_chain(fn, q, layers: int, pool_layers: int, reps: int) -> float:
    """Minimum over ``reps`` of one eval of ``layers`` chained calls, ms per layer."""
    return time_paths({"x": fn}, q, layers, pool_layers, reps)["x"]


def time_paths(fns: dict, q, layers: int, pool_layers: int, reps: int) -> dict:
    """``time_chain`` for several paths, interleaved rep by rep so that a load change
    on a shared machine hits every path alike: name -> ms per layer (minimum)."""
    for fn in fns.values():
        mx.eval(chain(fn, q, layers, pool_layers))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            mx.eval(chain(fn, q, layers, pool_layers))
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t / layers * 1e3 for name, t in best.items()}


def measure(q_heads, kv_heads, head_dim, dtype, batch, ctx, slabs, *, block_size=16,
            layers=4, reps=3, selector: Selector | None = None) -> ProfileEntry:
    """One profile entry: both paths timed side by side on the same pool."""
    selector = selector or Selector()
    q, pool, b = build_case(q_heads, kv_heads, head_dim, dtype, batch, ctx, slabs, block_size)
    scale = head_dim ** -0.5
    gather = GatherSDPA()
    key = make_key(q, pool, b, current_backend())
    native = selector.native(key.backend)
    fns = {"gather": lambda x, i: gather(x, pool, i, b, scale)}
    if native.decline(q, pool, b) is None:
        fns["native"] = lambda x, i: native(x, pool, i, b, scale)
    t = time_paths(fns, q, layers, 1, reps)
    return ProfileEntry(key.backend, dtype, head_dim, q_heads, kv_heads, block_size,
                        batch, ctx, key.slabs_bucket, t["gather"], t.get("native"))


def calibrate_geometry(q_heads: int, kv_heads: int, head_dim: int, dtype: str, *,
                       block_size: int = 16, batches=(1, 4, 8, 16),
                       contexts=(1024, 4096, 16384), slabs=("one", "many"),
                       layers: int = 4, reps: int = 3, short: bool = False,
                       max_tokens: int | None = None, log=print) -> list[ProfileEntry]:
    """Entries for one geometry over the grid (``short``: the start-up grid)."""
    if short:  # start-up: 8 points, 2 layers, 2 reps (about a minute on this 2-core CPU)
        batches, contexts, slabs = SHORT["batches"], SHORT["contexts"], SHORT["slabs"]
        layers, reps = min(layers, 2), min(reps, 2)
    selector = Selector()
    out = []
    for b in batches:
        for c in contexts:
            if max_tokens is not None and b * c > max_tokens:
                continue
            for s in slabs:
                e = measure(q_heads, kv_heads, head_dim, dtype, b, c, s,
                            block_size=block_size, layers=layers, reps=reps,
                            selector=selector)
                log(f"B{b} ctx{c} {s}: gather {e.gather_ms:.3f} ms, native "
                    f"{'declined' if e.native_ms is None else f'{e.native_ms:.3f} ms'}"
                    f" -> {e.faster}")
                out.append(e)
    return out


def merge_and_save(cache_dir: Path, entries: list[ProfileEntry]) -> Profile:
    """Add ``entries`` to this device's profile (replacing the same points) and save."""
    old = load_for_device(cache_dir)
    point = lambda e: (e.backend, e.dtype, e.head_dim, e.q_heads, e.kv_heads,  # noqa: E731
                       e.block_size, e.batch, e.ctx, e.slabs)
    new = {point(e) for e in entries}
    kept = [e for e in (old.entries if old else []) if point(e) not in new]
    prof = Profile(device_id(), mx.__version__, kept + entries)
    prof.save(profile_path(cache_dir))
    return prof


def calibrate_startup(q_heads: int, geom: PoolGeometry, cache_dir: Path, selector: Selector,
                      log=print) -> Profile:
    """``slabserve serve --calibrate``: the short grid for the served model's geometry,
    merged into this device's profile, saved, and installed in ``selector``."""
    dtype = str(geom.dtype).rsplit(".", 1)[-1]
    entries = calibrate_geometry(q_heads, geom.kv_heads, geom.head_dim, dtype,
                                 block_size=geom.block_size, short=True, log=log)
    prof = merge_and_save(cache_dir, entries)
    selector.set_profile(prof)
    return prof

"""``slabserve bench cuda-kernel --grid``: the native kernel's device time per launch
against its grid's chunk count and merge form.

The chunk plan (attention/cuda_plan.py) picks the grid's chunks from the batch alone, each
sequence splitting its own pages over at most that many chunks of at least the plan's
fewest pages (``MP``), and picks the merge form (fused into the main launch, or a second
launch).  Wall-time sweeps (``--sweep``) time chains of launches, host work included; here
every launch is timed on the device (PyTorch's profiler over CUPTI, bench/device_time.py):
per cell, the plan's own launch, then grid chunks 1-64 with each sequence split as the
plan splits it (``MP`` = the plan's: later chunks empty) and over every chunk (``MP`` = 1),
each merge form.  It decided the plan of docs/adr/0004-cuda-kernel.md (the fused
tensor-core kernel's time grows with its grid's chunks, used or empty).

Invariants: every launch is compiled before the trace; a launch's device time is the sum
of its kernels' durations (the main launch, and the merge launch when split), the median
over ``reps`` launches.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import mlx.core as mx

from slabserve.attention.cuda_plan import min_pages, plan_chunks
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.bench import device_time

CHUNKS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class GridLaunch:
    """One launch form: ``chunks`` None is the plan's own launch (its chunks, pages and
    merge form); otherwise forced chunks, merge ``fused`` or split, ``pages`` = MP."""

    label: str
    chunks: int | None = None
    fused: bool = False
    pages: int = 1


def launches(plan_pages: int, chunk_list=CHUNKS) -> list[GridLaunch]:
    """The plan's launch, then per chunk count each ``MP`` (1 and the plan's) and merge
    form (fused, split)."""
    out = [GridLaunch("plan")]
    for c in chunk_list:
        for pages in sorted({1, plan_pages}):
            for fused in (True, False):
                out.append(GridLaunch(f"c{c} mp{pages} {'fused' if fused else 'split'}",
                                      c, fused, pages))
    return out


def launch_times(steps: list[list[tuple[float, float, str]]], count: int,
                 reps: int) -> list[dict]:
    """Per launch form (``reps`` consecutive traced steps each): medians of its kernel
    count, device microseconds (all kernels), the main launch's and the merge's."""
    out = []
    for i in range(count):
        mine = steps[i * reps:(i + 1) * reps]
        totals = [device_time.summarize(k) for k in mine]
        merge = [k[1][1] for k in mine if len(k) > 1]
        out.append(dict(
            kernels=statistics.median(t.kernels for t in totals),
            device_us=statistics.median(t.busy_us for t in totals),
            main_us=statistics.median(k[0][1] if k else 0.0 for k in mine),
            merge_us=statistics.median(merge) if merge else 0.0))
    return out


def grid_cell(hq: int, hkv: int, d: int, dt, b: int, ctx: int, chunk_list=CHUNKS,
              reps: int = 12, nat: NativeCUDA | None = None) -> dict:
    """One (shape, batch, context) cell: the plan's chunks, MP and variant, and one row
    per launch form (``launches``) with its device times (``launch_times``)."""
    from slabserve.bench.cuda_kernel import make_case

    pool, batch, q = make_case([ctx] * b, hq, hkv, d, 16, dt, 4096)
    scale = 1.0 / math.sqrt(d)
    nat = nat or NativeCUDA()
    reason = nat.decline(q, pool, batch)
    if reason:
        raise RuntimeError(f"the native kernel declines this cell: {reason}")
    params = nat._plan_params(q, pool.geom)
    mp = min_pages(params, pool.geom.block_size)
    forms = launches(mp, chunk_list)

    def call(f: GridLaunch):
        if f.chunks is None:
            return nat(q, pool, 0, batch, scale)
        return nat._run(q, pool, 0, batch, scale, f.chunks, fused=f.fused, pages=f.pages)

    for f in forms:  # compile every launch before the trace
        mx.eval(call(f))
    events = device_time.trace(lambda i: mx.eval(call(forms[i // reps])), len(forms) * reps)
    times = launch_times(device_time.kernels_by_step(events), len(forms), reps)
    variant = nat._case(q, pool.geom)[0]
    return dict(shape=f"{hq}/{hkv}/{d}", dtype=str(dt).split(".")[-1], B=b, ctx=ctx,
                variant=variant, plan_chunks=plan_chunks(b, nat._head_blocks(q, pool.geom),
                                                         params),
                mp=mp, rows=[dict(launch=f.label, **t) for f, t in zip(forms, times,
                                                                        strict=True)])


def grid_markdown(cell: dict) -> str:
    """A cell's heading line and table."""
    lines = [f"{cell['shape']} {cell['dtype']} B={cell['B']} ctx={cell['ctx']}: plan "
             f"{cell['plan_chunks']} chunks, MP {cell['mp']} pages ({cell['variant']})",
             "| launch | kernels | device us | main us | merge us |", "|---|--:|--:|--:|--:|"]
    for r in cell["rows"]:
        lines.append(f"| {r['launch']} | {r['kernels']:.0f} | {r['device_us']:.1f} | "
                     f"{r['main_us']:.1f} | {r['merge_us']:.1f} |")
    return "\n".join(lines) + "\n"


def run_grid(cells, shapes: list[str]) -> list[dict] | None:
    """Every (batch, context) of ``cells`` at each ``q/kv/head_dim/dtype`` shape, each
    cell's table printed as it comes; None (with the reason on stdout) where device time
    cannot be measured."""
    from slabserve.bench.cuda_kernel import parse_shape

    reason = device_time.reason()
    if reason:
        print(f"grid: device time {reason}; skipped")
        return None
    out = []
    for shape in shapes:
        s = parse_shape(shape)
        for b, ctx in cells:
            cell = grid_cell(s["hq"], s["hkv"], s["d"], s["dt"], b, ctx)
            print(grid_markdown(cell), flush=True)
            out.append(cell)
    return out

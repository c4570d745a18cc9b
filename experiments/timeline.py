"""Where a chained layer's time goes on the GPU: a kernel timeline of the per-layer table.

``python -m experiments.timeline --cells 8:16384,8:4096 --natives auto [--layers 16]``
(from the repository root; on the GPU machine with ``PYTHONPATH=$PWD:/tmp/site``; needs
PyTorch with CUDA for its profiler).

Runs the same chain as ``bench.cuda_kernel --table`` (16 layers in one graph, built before
``mx.eval``) for each native and for MLX SDPA on contiguous K/V, under PyTorch's profiler
(CUPTI sees every kernel of the process, MLX's included, also inside CUDA graphs).  Per
method and cell, per layer, medians over ``--reps`` evals:

* ``wall``: ``mx.eval`` + synchronize, as the table measures it;
* ``lead``: from the start of ``mx.eval`` to the first kernel (host work before the first
  graph is launched);
* ``busy``: kernel time (the sum of kernel durations), split by kernel name;
* ``gap``: GPU idle time between the first kernel and the last;
* ``tail``: from the last kernel's end to the return of synchronize.

``wall = lead + busy + gap + tail`` up to clock skew.  Needs CUDA and PyTorch; a diagnostic,
not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx

from slabserve.bench.cuda_kernel import (
    chain,
    cuda_args,
    int_cells,
    make_case,
    make_natives,
    sdpa_contig_chain,
)


def _kernel_kind(name: str) -> str:
    for k in ("split", "merge", "direct", "fused"):
        if f"slabserve_pooled_{k}" in name:
            return k
    return "sdpa" if ("fprop" in name or "sdpa" in name.lower() or "flash" in name) else "other"


def _profile_evals(fn, reps: int) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    graphs = [fn() for _ in range(reps)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, y in enumerate(graphs):
            with record_function(f"eval{i}"):
                mx.eval(y)
                mx.synchronize()
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return summarize(events)


def summarize(events: list[dict]) -> list[dict]:
    """Per ``eval<i>`` annotation of a Chrome trace: wall, lead, gap, tail, kernel count
    and busy time by kernel kind (microseconds; kernels assigned by their start)."""
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("name", "").startswith("eval") and e.get("ph") == "X"
                   and e.get("cat") == "user_annotation")
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "kernel" and e.get("ph") == "X")
    out = []
    for t0, t1 in marks:
        ks = [k for k in kernels if t0 <= k[0] <= t1]
        if not ks:
            continue
        busy: dict[str, float] = {}
        gap, end = 0.0, ks[0][0]
        for s, e, name in ks:
            kind = _kernel_kind(name)
            busy[kind] = busy.get(kind, 0.0) + (e - s)
            gap += max(0.0, s - end)
            end = max(end, e)
        out.append(dict(wall=t1 - t0, lead=ks[0][0] - t0, gap=gap, tail=t1 - end,
                        kernels=len(ks), **{f"busy_{k}": v for k, v in busy.items()}))
    return out


def _median_per_layer(runs: list[dict], layers: int) -> dict:
    keys = sorted({k for r in runs for k in r})
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs) / layers, 2)
            if k != "kernels" else statistics.median(r[k] for r in runs) for k in keys}


def cell_timeline(b: int, ctx: int, layers: int, natives: dict, reps: int,
                  chunks=(), sdpa: bool = True, same_layer: bool = False) -> dict:
    """``same_layer``: every layer of the chain reads layer 0's K/V (address translations
    and whatever of it L2 holds stay warm) instead of its own, as the table does."""
    pool, batch, q = make_case([ctx] * b, 32, 8, 64, 16, mx.float16, 4096,
                               layers=1 if same_layer else layers)
    scale = 1.0 / math.sqrt(64)
    res: dict = {"B": b, "ctx": ctx, "layers": layers, "same_layer": same_layer}

    def lay(i: int) -> int:
        return 0 if same_layer else i

    for name, nat in natives.items():
        assert nat.decline(q, pool, batch) is None
        fns = {name: chain(lambda x, i, nat=nat: nat(x, pool, lay(i), batch, scale), q,
                           layers)}
        for c in chunks:
            fns[f"{name}_c{c}"] = chain(
                lambda x, i, nat=nat, c=c: nat._run(x, pool, lay(i), batch, scale, c), q,
                layers)
        for key, fn in fns.items():
            for _ in range(3):
                mx.eval(fn())
            res[key] = _median_per_layer(_profile_evals(fn, reps), layers)
    if not sdpa:
        return res
    pool = None
    fn = sdpa_contig_chain(q, ctx, layers, 8, scale, distinct=not same_layer)()
    for _ in range(3):
        mx.eval(fn())
    res["sdpa_contig"] = _median_per_layer(_profile_evals(fn, reps), layers)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.timeline")
    ap.add_argument("--cells", default="8:16384,8:4096,16:4096,4:16384,1:32768")
    ap.add_argument("--natives", default="auto")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", default="", help="also these forced chunk counts")
    ap.add_argument("--no-sdpa", action="store_true", help="skip MLX SDPA on contiguous K/V")
    ap.add_argument("--same-layer", action="store_true",
                    help="every layer of the chain reads layer 0's K/V")
    ap.add_argument("--out", default=None)
    a = cuda_args(ap, argv)
    if a is None:
        return 1
    rows = []
    for b, ctx in int_cells(a.cells):
        chunks = [int(c) for c in a.chunks.split(",") if c]
        r = cell_timeline(b, ctx, a.layers, make_natives(a.natives), a.reps, chunks,
                          not a.no_sdpa, a.same_layer)
        rows.append(r)
        print(json.dumps(r), flush=True)
        mx.clear_cache()
    print("\nper layer us (median of evals): wall = lead + busy + gap + tail")
    print("| B | ctx | method | wall | lead | busy (by kernel) | gap | tail | kernels |")
    print("|--:|--:|---|--:|--:|---|--:|--:|--:|")
    for r in rows:
        for m, v in r.items():
            if not isinstance(v, dict):
                continue
            busy = ", ".join(f"{k[5:]} {x}" for k, x in v.items() if k.startswith("busy_"))
            print(f"| {r['B']} | {r['ctx']} | {m} | {v['wall']} | {v['lead']} | {busy} | "
                  f"{v['gap']} | {v['tail']} | {v['kernels']} |")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "timeline.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

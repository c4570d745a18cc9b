"""``slabserve bench decode-phases``: where a decode step's time goes, eager vs compiled.

For an embedded model (``--embedded NAME[:DTYPE]``), each batch ``B`` and context, ``B``
sequences holding ``ctx`` cached tokens (decode_step's fast fill: real allocator blocks,
random K/V) decode one token per step through ``ModelExecutor.execute``, the engine
thread's call, with the selector on auto.  Three modes interleaved step by step in one
runner (order rotated each round): ``eager`` runs every layer's Python each step (what
``--enforce-eager`` serves), ``compiled`` replays each layer's compiled stages
(engine/staged.py), ``graph`` runs the whole step as one compiled graph
(engine/step_graph.py; the default where every layer's path has one, else it runs the
stages).  Then ``overlap`` decodes the same positions as ``graph`` does, but as the engine
thread does with async scheduling: step t+1 is planned and submitted (its tokens read on
the device from step t's samples) before step t's tokens are waited for, so its plan,
build and launch overlap step t's device time.  The same positions are decoded in every
mode, so their first sampled tokens must agree (reported).

Phases of a step, medians over ``--steps`` after ``--warmup`` (``wall`` is their sum):

- ``plan``: the scheduler's part (block tables grown, one ``ScheduledChunk`` each);
- ``build``: the host building the forward's graph (``ModelRunner.last_build_s``);
- ``launch``: ``mx.async_eval`` of the forward handing it to the device;
- ``sync``: sampling (its graph, then the one wait for the device and the token ids):
  on a GPU mostly the device's time not hidden behind building.  In ``overlap`` the wait
  is for the previous step, and ``step ms`` (the sum) is one loop iteration: the rate at
  which steps complete.

With ``--device-time`` (CUDA with PyTorch), each waited mode then runs ``--steps`` more
steps under CUPTI (bench/device_time.py): the device's busy time (kernels' summed
durations), its span (first kernel's start to the last one's end: busy plus the gaps where
it waited for the host) and the kernels per step.  ``sync`` minus the span's part after
the launch is the wait for the token ids; ``span`` near ``busy`` means the host kept the
device fed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slabserve.bench.decode_step import (
    BenchConfig,
    add_grid_args,
    cell_fits,
    fast_fill,
    grid_config,
    load_runner,
    machine,
    plan_step,
)

MODES = ("eager", "compiled", "graph")  # interleaved step by step
ALL_MODES = (*MODES, "overlap")  # overlap runs its steps back to back, after them
PHASES = ("plan", "build", "launch", "sync")
DEFAULT_OUT = Path("out/decode-phases")


@dataclass(frozen=True)
class Step:
    plan: float
    build: float
    launch: float
    sync: float

    @property
    def wall(self) -> float:
        return self.plan + self.build + self.launch + self.sync


def one_step(runner, executor, tables, tokens, pos, index, params) -> tuple[Step, list[int]]:
    t0 = time.perf_counter()
    plan = plan_step(runner, tables, tokens, pos, index, params)
    t1 = time.perf_counter()
    out = executor.execute(plan)
    t2 = time.perf_counter()
    build, fwd = runner.last_build_s, executor.last_forward_s
    toks = [out.sampled[c.request_id].token_id for c in plan.decodes]
    return Step(t1 - t0, build, fwd - build, (t2 - t1) - fwd), toks


def run_cell(runner, executor, cfg: BenchConfig, batch: int, ctx: int,
             device_time: bool = False) -> dict:
    from slabserve.scheduler.api import SamplingParams

    tables = fast_fill(runner, batch, ctx, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = [int(x) for x in rng.integers(0, runner.model.args.vocab_size, batch)]
    tokens = {m: list(start) for m in MODES}
    first: dict[str, list[int]] = {}
    steps: dict[str, list[Step]] = {m: [] for m in MODES}
    params = SamplingParams(max_tokens=cfg.rounds + 1, temperature=0.0, ignore_eos=True)
    try:
        for r in range(cfg.rounds):
            order = MODES[r % 3:] + MODES[: r % 3]
            for m in order:
                _set_mode(runner, m)
                st, tokens[m] = one_step(runner, executor, tables, tokens[m], ctx + r, r,
                                         params)
                first.setdefault(m, tokens[m])
                if r >= cfg.warmup:
                    steps[m].append(st)
        steps["overlap"], first["overlap"] = run_overlap(runner, executor, cfg, tables,
                                                         start, ctx, params)
        device = (device_phase(runner, executor, cfg, tables, tokens, ctx + cfg.rounds)
                  if device_time else {})
    finally:
        _set_mode(runner, "graph")
        for t in tables:
            runner.allocator.free(t)
    runner.allocator.check_integrity()
    modes = {m: {**_summary(batch, steps[m]), **device.get(m, {})} for m in ALL_MODES}
    return dict(batch=batch, ctx=ctx, skipped=None, modes=modes,
                same_first_tokens=first["eager"] == first["compiled"] == first["graph"],
                first_tokens=first,  # per mode; the table shows agreement with eager
                agree={m: sum(x == y for x, y in zip(first[m], first["eager"], strict=True))
                       for m in ALL_MODES},
                **{f"{m}_over_eager": modes[m]["wall_ms"] / modes["eager"]["wall_ms"]
                   for m in ALL_MODES[1:]})


def _set_mode(runner, mode: str) -> None:
    runner.compile_decode = mode != "eager"
    runner.step_graph = mode == "graph" and runner.step_graphs is not None


def device_phase(runner, executor, cfg: BenchConfig, tables, tokens: dict, pos: int) -> dict:
    """Per waited mode, ``cfg.steps`` more steps from ``pos`` under CUPTI
    (bench/device_time.py): medians of their kernels, busy and span (ms).  These steps are
    not the ones whose host phases are reported (profiling slows the host)."""
    from slabserve.bench.device_time import measure
    from slabserve.scheduler.api import SamplingParams

    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    out = {}
    for m in MODES:
        _set_mode(runner, m)
        toks = list(tokens[m])

        def step(i: int, toks=toks) -> None:
            toks[:] = one_step(runner, executor, tables, toks, pos + i, cfg.rounds + i,
                               params)[1]

        step(0)  # the profiler's own start-up lands outside the measured steps
        got = measure(lambda i, step=step: step(1 + i), cfg.steps)
        out[m] = dict(device_kernels=float(np.median([k.kernels for k in got])),
                      device_busy_ms=float(np.median([k.busy_us for k in got])) / 1e3,
                      device_span_ms=float(np.median([k.span_us for k in got])) / 1e3)
    return out


def run_overlap(runner, executor, cfg: BenchConfig, tables, start: list[int], ctx: int,
                params) -> tuple[list[Step], list[int]]:
    """``cfg.rounds`` steps at positions ``ctx + r``, each submitted before the previous
    one is collected (the engine thread's order with async scheduling)."""
    from slabserve.engine.step import PENDING

    _set_mode(runner, "graph")
    steps: list[Step] = []
    first: list[int] = []
    plan = plan_step(runner, tables, start, ctx, 0, params)
    executor.submit(plan)
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        nxt = (plan_step(runner, tables, [PENDING] * len(tables), ctx + r + 1, r + 1, params)
               if r + 1 < cfg.rounds else None)
        t1 = time.perf_counter()
        build = fwd = 0.0
        if nxt is not None:
            executor.submit(nxt)
            build, fwd = runner.last_build_s, executor.last_forward_s
        out = executor.collect(plan)
        t2 = time.perf_counter()
        first = first or [out.sampled[c.request_id].token_id for c in plan.decodes]
        if r >= cfg.warmup and nxt is not None:
            steps.append(Step(t1 - t0, build, fwd - build, (t2 - t1) - fwd))
        plan = nxt
    return steps, first


def _summary(batch: int, steps: list[Step]) -> dict:
    ms = {p: float(np.median([getattr(s, p) for s in steps])) * 1e3 for p in PHASES}
    wall = float(np.median([s.wall for s in steps])) * 1e3
    return dict(**{f"{p}_ms": v for p, v in ms.items()}, wall_ms=wall,
                tok_s=batch / wall * 1e3)


def table(cells: list[dict]) -> str:
    """Markdown rows per cell and mode; with device times (``--device-time``) also the
    device's busy and span ms and kernels per waited step (overlap: not measured)."""
    device = any("device_busy_ms" in r for c in cells if not c["skipped"]
                 for r in c["modes"].values())
    extra = " device busy ms | device span ms | kernels |" if device else ""
    head = ["| B | ctx | mode | plan ms | build ms | launch ms | sync ms | step ms | tok/s |"
            " / eager | first tokens as eager's |" + extra,
            "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|" + "--:|" * (3 if device else 0)]
    for c in cells:
        if c["skipped"]:
            head.append(f"| {c['batch']} | {c['ctx']} | skipped: {c['skipped']} |")
            continue
        for m, r in c["modes"].items():
            tail = (f"{c[f'{m}_over_eager']:.2f} | {c['agree'][m]}/{c['batch']}"
                    if m != "eager" else " | ")
            if device:
                tail += (f" | {r['device_busy_ms']:.2f} | {r['device_span_ms']:.2f} | "
                         f"{r['device_kernels']:.0f}" if "device_busy_ms" in r else " | | |")
            head.append(f"| {c['batch']} | {c['ctx']} | {m} | " + " | ".join(
                f"{r[f'{p}_ms']:.2f}" for p in PHASES) + f" | {r['wall_ms']:.2f} | "
                f"{r['tok_s']:.1f} | {tail} |")
    return "\n".join(head)


def parse_args(argv: list[str]) -> tuple[BenchConfig, Path, bool, bool]:
    ap = argparse.ArgumentParser(prog="slabserve bench decode-phases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(ap, "1,8,32", "1k,4k,16k", 65536, "weights + KV")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rows-matmul", action=argparse.BooleanOptionalAction, default=False,
                    help="projections of 2-16 rows as the few-rows CUDA kernel (serve "
                         "--rows-matmul; engine/rows_matmul.py)")
    ap.add_argument("--device-time", action="store_true",
                    help="also each waited mode's device busy and span time per step from "
                    "CUPTI (CUDA, needs PyTorch; bench/device_time.py)")
    a = ap.parse_args(argv)
    return grid_config(a, ("auto",)), a.out, a.rows_matmul, a.device_time


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, out, rows_matmul, device_time = parse_args(argv)
    if device_time:
        from slabserve.bench.device_time import reason

        if (why := reason()) is not None:
            print(f"--device-time: not measured here ({why})", file=sys.stderr)
            device_time = False
    from slabserve.engine.config import RunnerConfig

    runner, executor, weights = load_runner(cfg, RunnerConfig(compile_decode=True,
                                                              rows_matmul=rows_matmul))
    print(f"model {cfg.model} {cfg.dtype}, {runner.geom.num_layers} layers", flush=True)
    cells = []
    for b in sorted(cfg.batches):
        for ctx in sorted(cfg.contexts):
            why = cell_fits(runner, cfg, weights, b, ctx)
            cells.append(dict(batch=b, ctx=ctx, skipped=why) if why else
                         run_cell(runner, executor, cfg, b, ctx, device_time))
            print(table(cells[-1:]).splitlines()[-1], flush=True)
    md = table(cells)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{cfg.model}-{cfg.dtype}"
    meta = dict(config=asdict(cfg), machine=machine(),
                command=" ".join(["slabserve bench decode-phases", *argv]))
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, cells=cells), indent=1))
    (out / f"{stem}.md").write_text(md + "\n")
    print(f"\n{md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

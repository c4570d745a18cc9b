"""``slabserve bench prefix-overhead``: what prefix caching costs where nothing is shared,
in one process.

``python -m slabserve.bench.prefix_overhead`` (or ``slabserve bench prefix-overhead``).  One
embedded model (``--embedded NAME[:DTYPE]``) is loaded once; two engines are built over that
same model object, identical (block size, slab size, KV budget, scheduler and runner
settings, decode-path selector) except ``CacheConfig.prefix_caching`` on / off.  Each is
driven by the serving loop's own step, ``Scheduler.schedule() -> ModelExecutor.execute(plan)
-> Scheduler.update(plan, out)``, in a plain loop (no HTTP, no asyncio, no threads), so the
process-to-process spread of a two-server load test drops out of the comparison.

Workload, nothing shared: ``--requests`` prompts of ``--prompt`` random token ids, every
prompt with its own first token (so no block of one can match a block of another), each
generating ``--max-tokens`` tokens (greedy, ``ignore_eos``), at most ``--concurrency`` in
flight: a closed loop that adds the next request when one finishes.  The two engines run in
lockstep: one step of each per turn, the order reversed every turn (``lockstep``), so drifts
of the machine over a run (clocks, other load) fall on both alike; each engine's time is the
sum of its own steps.  ``--warmup`` untimed pairs of runs first (compiles, graph builds, pool
growth), then ``--rounds`` timed pairs, the engine that steps first alternating by round.
Within a round both engines get the same prompts (under their own request ids); every round
has prompts of its own, so the caching engine, whose pool keeps every finished prompt's
blocks cached, never hits (asserted: 0 hit tokens).

Per run: output tokens/s (output tokens / the engine's own step time), steps, mean step time
split into schedule / execute (of it, ``runner.forward``) / update, prefill tokens computed,
preemptions, prefix-cache queries and hits (tokens), evictions, the mean number of slabs a
step's block tables touch, the pool's slabs, and the decode paths run.  Per round: the on/off
tok/s ratio and whether every request's greedy tokens were equal on and off (they are by
design).  After every run the engine holds no block and passes ``check_integrity()``.
Markdown on stdout (short table last), JSON and markdown under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from slabserve.bench.decode_step import machine, parse_model

DEFAULT_OUT = Path("out/prefix-overhead")
SETTINGS = ("on", "off")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark.  ``kv_budget_bytes`` None: what the load tester gives a server, room
    for ``concurrency`` full contexts plus 25%, at least 1 GiB.  ``slab_tokens`` None: the
    server's automatic slab size.  Scheduler fields None: the device's defaults."""

    model: str = "llama-3.2-1b"
    dtype: str = "bfloat16"
    requests: int = 32
    prompt: int = 4032
    max_tokens: int = 64
    concurrency: int = 8
    rounds: int = 5
    warmup: int = 1
    kv_budget_bytes: int | None = None
    slab_tokens: int | None = None
    block_size: int = 16
    max_step_tokens: int | None = None
    prefill_chunk: int | None = None
    prefill_align: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.requests, self.prompt, self.max_tokens, self.concurrency, self.rounds) < 1:
            raise ValueError("requests, prompt, max_tokens, concurrency and rounds must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError("kv_budget_bytes must be positive")

    @property
    def runs(self) -> int:
        """Prompt sets drawn: one per warm-up run and one per round."""
        return self.warmup + self.rounds


@dataclass
class Stack:
    """One engine: runner, executor and scheduler over the shared model."""

    label: str
    runner: object
    executor: object
    scheduler: object


# ---- engines ---------------------------------------------------------------------------
def kv_budget(cfg: BenchConfig, model_dir: Path) -> int:
    """``cfg.kv_budget_bytes``, or what the load tester gives a server (loadtest/servers.py)
    for ``concurrency`` sequences of prompt + output tokens."""
    from slabserve.loadtest.servers import kv_budget_bytes

    if cfg.kv_budget_bytes is not None:
        return cfg.kv_budget_bytes
    return kv_budget_bytes(model_dir, cfg.concurrency * (cfg.prompt + cfg.max_tokens))


def scheduler_config(cfg: BenchConfig):
    from slabserve.scheduler.config import SchedulerConfig

    return SchedulerConfig.for_device(mx.default_device().type == mx.gpu,
                                      max_step_tokens=cfg.max_step_tokens,
                                      prefill_chunk=cfg.prefill_chunk,
                                      prefill_align=cfg.prefill_align)


def build_stacks(cfg: BenchConfig, model, tokenizer, model_dir: Path) -> dict[str, Stack]:
    """The two engines over ``model`` (loaded from ``model_dir``), built as ``slabserve
    serve`` builds one (slabserve/build.py, slabserve/serve.py), runner settings and
    selector read from the environment alike."""
    from slabserve import env
    from slabserve.attention import Selector
    from slabserve.attention.profile import load_for_device
    from slabserve.build import model_context
    from slabserve.engine.config import CacheConfig, RunnerConfig
    from slabserve.engine.executor import ModelExecutor
    from slabserve.engine.runner import ModelRunner
    from slabserve.scheduler.scheduler import Scheduler

    gpu = mx.default_device().type == mx.gpu
    rcfg = RunnerConfig(prefill_kv_bucket=env.prefill_kv_bucket(),
                        host_math=env.host_math() is not False,
                        linear_layout=env.linear_layout() is not False, compile_decode=gpu)
    scfg = scheduler_config(cfg)
    budget = kv_budget(cfg, model_dir)
    profile = load_for_device(env.cache_dir())
    max_context = min(model_context(model, tokenizer), scfg.max_context or 1 << 62)
    stacks = {}
    for label in SETTINGS:
        cache = CacheConfig(cfg.block_size, cfg.slab_tokens, budget,
                            prefix_caching=label == "on")
        runner = ModelRunner(model, cache, rcfg, Selector(env.paged_attention_native(), profile))
        sched = Scheduler(scfg, runner.allocator, runner.block_size, max_context,
                          tokenizer.eos_token_ids)
        stacks[label] = Stack(label, runner, ModelExecutor(runner, max_context), sched)
    a, b = (stacks[s].runner for s in SETTINGS)
    assert a.geom == b.geom and a.allocator.max_blocks == b.allocator.max_blocks
    return stacks


def make_prompts(cfg: BenchConfig, vocab: int) -> list[list[tuple[int, ...]]]:
    """``cfg.runs`` sets of ``cfg.requests`` random prompts; all first tokens distinct."""
    total = cfg.runs * cfg.requests
    if total > vocab:
        raise ValueError(f"{total} prompts need distinct first tokens; the vocabulary has {vocab}")
    rng = np.random.default_rng(cfg.seed)
    firsts = rng.choice(vocab, total, replace=False)
    rest = rng.integers(0, vocab, (total, cfg.prompt - 1))
    prompts = [(int(f), *map(int, r)) for f, r in zip(firsts, rest, strict=True)]
    return [prompts[i * cfg.requests:(i + 1) * cfg.requests] for i in range(cfg.runs)]


# ---- one run ---------------------------------------------------------------------------
@dataclass
class _Trace:
    """Per-step measurements of one run."""

    schedule: list[float] = field(default_factory=list)
    execute: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    slabs: list[int] = field(default_factory=list)
    prefill_tokens: int = 0
    output_tokens: int = 0


def _counters(st: Stack) -> dict:
    s, a = st.scheduler, st.runner.allocator
    return dict(preemptions=s.preemptions, queries=s.prefix.queries, hits=s.prefix.hits,
                evictions=a.evictions,
                paths=dict(st.runner.attention.selector.path_counts()))


class EngineRun:
    """One engine's closed loop over ``prompts`` (at most ``concurrency`` in flight),
    advanced one engine step at a time by ``step`` so that two engines run in lockstep.
    ``busy_s``: the time of its own steps (admitting requests, schedule, execute, update,
    releasing finished ones), the bench's own bookkeeping excluded."""

    def __init__(self, st: Stack, prompts, tag: str, concurrency: int, max_tokens: int):
        from slabserve.scheduler.api import SamplingParams

        self.st, self.tag, self.concurrency = st, tag, concurrency
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.queue, self.live = deque(enumerate(prompts)), {}
        self.outputs: dict[int, list[int]] = {}
        self.trace, self.busy_s = _Trace(), 0.0
        self._slab_blocks = st.scheduler.allocator.slab_blocks

    @property
    def done(self) -> bool:
        return not self.queue and not self.live

    def step(self) -> None:
        from slabserve.scheduler.api import Request

        sched, ex, tr = self.st.scheduler, self.st.executor, self.trace
        t_start = time.perf_counter()
        while self.queue and len(self.live) < self.concurrency:
            i, prompt = self.queue.popleft()
            self.live[f"{self.tag}-{i}"] = i
            sched.add(Request(f"{self.tag}-{i}", prompt, self.params))
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        if plan.empty:
            raise RuntimeError(f"{self.st.label}: an empty plan, {len(self.live)} in flight")
        out = ex.execute(plan)
        t2 = time.perf_counter()
        updates = sched.update(plan, out)
        t3 = time.perf_counter()
        for u in updates:
            self.outputs.setdefault(self.live[u.request_id], []).append(u.token.token_id)
            if u.finish_reason is not None:
                ex.release(u.request_id)
                del self.live[u.request_id]
        self.busy_s += time.perf_counter() - t_start
        tr.schedule.append(t1 - t0)
        tr.execute.append(t2 - t1)
        tr.forward.append(ex.last_forward_s)
        tr.update.append(t3 - t2)
        tr.prefill_tokens += plan.num_tokens - len(plan.decodes)
        tr.output_tokens += len(updates)
        sb = self._slab_blocks
        tr.slabs.append(len({b // sb for c in plan.chunks() for b in c.blocks}))


def lockstep(runs: list[EngineRun]) -> None:
    """Step every unfinished run once per turn, in the given order on even turns and the
    reverse on odd ones, until all are done: slow drifts of the machine (clocks, other
    load) fall on both engines alike, step by step."""
    turn = 0
    while not all(r.done for r in runs):
        for r in runs if turn % 2 == 0 else runs[::-1]:
            if not r.done:
                r.step()
        turn += 1


def run_pair(stacks: dict[str, Stack], order, prompts, suffix: str,
             cfg: BenchConfig) -> tuple[dict, dict]:
    """Both engines in lockstep over the same ``prompts``; ({setting: result row},
    {setting: outputs}).  Checks integrity and that every block came back."""
    before = {s: _counters(stacks[s]) for s in order}
    runs = [EngineRun(stacks[s], prompts, f"{s}-{suffix}", cfg.concurrency, cfg.max_tokens)
            for s in order]
    lockstep(runs)
    rows = {r.st.label: _row(r, before[r.st.label]) for r in runs}
    return rows, {r.st.label: r.outputs for r in runs}


def _row(run: EngineRun, before: dict) -> dict:
    st, tr = run.st, run.trace
    after = _counters(st)
    st.scheduler.check_integrity()  # the allocator's own check included
    alloc = st.runner.allocator
    assert alloc.num_used == 0 and not st.scheduler.has_work, "blocks held after the run"
    delta = {k: after[k] - before[k] for k in ("preemptions", "queries", "hits", "evictions")}
    assert delta["hits"] == 0, f"{run.tag}: {delta['hits']} prompt tokens hit the prefix cache"
    paths = {f"{p}:{r}": n - before["paths"].get((p, r), 0)
             for (p, r), n in after["paths"].items() if n > before["paths"].get((p, r), 0)}
    n = len(tr.schedule)
    return dict(setting=st.label, tag=run.tag, busy_s=run.busy_s,
                output_tokens=tr.output_tokens, tok_s=tr.output_tokens / run.busy_s, steps=n,
                prefill_tokens=tr.prefill_tokens, schedule_ms=1e3 * sum(tr.schedule) / n,
                execute_ms=1e3 * sum(tr.execute) / n, forward_ms=1e3 * sum(tr.forward) / n,
                update_ms=1e3 * sum(tr.update) / n, slabs_per_step=sum(tr.slabs) / n,
                pool_slabs=alloc.num_slabs, cached_blocks=alloc.num_cached, paths=paths,
                **delta)


# ---- the benchmark ---------------------------------------------------------------------
def run(cfg: BenchConfig, stacks: dict[str, Stack], vocab: int, log=print) -> dict:
    """Warm-up pairs, then the rounds (both engines in lockstep, which one steps first
    alternating by round); the result dict (see ``summarize``)."""
    sets = make_prompts(cfg, vocab)
    warmups, rounds = [], []
    for w in range(cfg.warmup):
        rows, _ = run_pair(stacks, SETTINGS, sets[w], f"w{w}", cfg)
        for s in SETTINGS:
            warmups.append(rows[s])
            log(_run_line(rows[s]))
    for r in range(cfg.rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        rows, outs = run_pair(stacks, order, sets[cfg.warmup + r], f"r{r}", cfg)
        for s in order:
            log(_run_line(rows[s]))
        rounds.append(dict(round=r, order=list(order), runs=rows,
                           on_over_off=rows["on"]["tok_s"] / rows["off"]["tok_s"],
                           outputs_equal=outs["on"] == outs["off"]))
    return summarize(warmups, rounds)


def summarize(warmups: list[dict], rounds: list[dict]) -> dict:
    """Per setting, the means over rounds of every run's numbers; the median on/off."""
    keys = ("tok_s", "steps", "schedule_ms", "execute_ms", "forward_ms", "update_ms",
            "prefill_tokens", "preemptions", "queries", "hits", "evictions", "slabs_per_step")
    settings = {s: {k: statistics.fmean(rd["runs"][s][k] for rd in rounds) for k in keys}
                for s in SETTINGS}
    ratios = [rd["on_over_off"] for rd in rounds]
    return dict(warmups=warmups, rounds=rounds, settings=settings,
                on_over_off_median=statistics.median(ratios),
                outputs_equal=all(rd["outputs_equal"] for rd in rounds),
                hits=sum(rd["runs"][s]["hits"] for rd in rounds for s in SETTINGS))


def _run_line(r: dict) -> str:
    return (f"{r['tag']}: {r['tok_s']:.1f} tok/s, {r['steps']} steps, schedule/execute/update "
            f"{r['schedule_ms']:.3f}/{r['execute_ms']:.2f}/{r['update_ms']:.3f} ms, "
            f"hits {r['hits']}, preemptions {r['preemptions']}")


def tables(res: dict) -> tuple[str, str]:
    """(per-run table, short per-round table) in markdown."""
    full = ["| round | caching | tok/s | steps | schedule ms | execute ms | forward ms | "
            "update ms | prefill tokens | preemptions | queries | hits | evictions | "
            "slabs/step | pool slabs | decode paths |", "|--:|---|" + "--:|" * 13 + "---|"]
    for rd in res["rounds"]:
        for s in rd["order"]:
            r = rd["runs"][s]
            full.append(
                f"| {rd['round'] + 1} | {s} | {r['tok_s']:.1f} | {r['steps']} | "
                f"{r['schedule_ms']:.3f} | {r['execute_ms']:.2f} | {r['forward_ms']:.2f} | "
                f"{r['update_ms']:.3f} | {r['prefill_tokens']} | {r['preemptions']} | "
                f"{r['queries']} | {r['hits']} | {r['evictions']} | "
                f"{r['slabs_per_step']:.2f} | {r['pool_slabs']} | "
                f"{', '.join(sorted(r['paths']))} |")
    short = ["| round | order | on tok/s | off tok/s | on / off | same tokens |",
             "|--:|---|--:|--:|--:|---|"]
    for rd in res["rounds"]:
        on, off = rd["runs"]["on"]["tok_s"], rd["runs"]["off"]["tok_s"]
        short.append(f"| {rd['round'] + 1} | {'/'.join(rd['order'])} | {on:.1f} | {off:.1f} | "
                     f"{rd['on_over_off']:.3f} | {rd['outputs_equal']} |")
    short.append(f"| median | | | | {res['on_over_off_median']:.3f} | {res['outputs_equal']} |")
    return "\n".join(full), "\n".join(short)


# ---- command line ----------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[BenchConfig, Path]:
    ap = argparse.ArgumentParser(prog="slabserve bench prefix-overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", default="llama-3.2-1b:bfloat16", help="NAME[:DTYPE]")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4032, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed pairs of runs first")
    ap.add_argument("--kv-gb", type=float, default=None,
                    help="KV pool budget per engine (default: the load tester's sizing)")
    ap.add_argument("--slab-tokens", type=int, default=None, help="default: automatic")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-step-tokens", type=int, default=None, help="default: per device")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default: per device")
    ap.add_argument("--prefill-align", type=int, default=None, help="default: per device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    name, dtype = parse_model(a.embedded)
    kv = None if a.kv_gb is None else int(a.kv_gb * 2**30)
    cfg = BenchConfig(name, dtype, a.requests, a.prompt, a.max_tokens, a.concurrency,
                      a.rounds, a.warmup, kv, a.slab_tokens, a.block_size, a.max_step_tokens,
                      a.prefill_chunk, a.prefill_align, a.seed)
    return cfg, a.out


def _header(cfg: BenchConfig, stacks: dict[str, Stack]) -> dict:
    r, s = stacks["on"].runner, stacks["on"].scheduler
    g = r.geom
    return dict(layers=g.num_layers, kv_heads=g.kv_heads, head_dim=g.head_dim,
                block_size=g.block_size, slab_tokens=g.slab_blocks * g.block_size,
                kv_budget_gib=r.allocator.max_blocks * g.block_bytes / 2**30,
                max_step_tokens=s.cfg.max_step_tokens, prefill_chunk=s.cfg.prefill_chunk,
                prefill_align=s.cfg.prefill_align, max_context=s.max_context)


def main(argv: list[str] | None = None) -> int:
    from slabserve import env
    from slabserve.attention.selector_rules import current_backend
    from slabserve.engine.loader import load
    from slabserve.mlxmem import configure_memory

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, out = parse_args(argv)
    configure_memory(None)
    model, tok, path = load(f"embedded:{cfg.model}", cfg.dtype, cache_dir=env.cache_dir())
    stacks = build_stacks(cfg, model, tok, path)
    head = _header(cfg, stacks)
    print(f"model {cfg.model} {cfg.dtype} on {mx.default_device()}: "
          + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in head.items()), flush=True)
    res = run(cfg, stacks, model.args.vocab_size, log=lambda s: print(s, flush=True))
    full, short = tables(res)
    stem = f"{current_backend()}-{cfg.model}-{cfg.dtype}"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["slabserve bench prefix-overhead", *argv])
    meta = dict(config=asdict(cfg), engine=head, machine=machine(), command=command)
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, **res), indent=1))
    (out / f"{stem}.md").write_text(f"{full}\n\n{short}\n")
    print(f"\n{full}\n\nwrote {out / stem}.json\n\n{short}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``slabserve bench prefix-lookup``: the host cost of automatic prefix caching, no model.

Pure Python (the allocator, the prefix index and the scheduler; no MLX), so it runs alike on
every machine.  Two parts:

**Per admitted prompt** (``--prompt`` tokens, default 16,384; ``--cached`` blocks cached,
default 1,000, all of them the prompt's first blocks, evictable): the median over
``--repeat`` timings of

- ``keys``: the hash chain of the prompt's full blocks (``block_keys``);
- ``lookup hit`` / ``lookup miss``: ``BlockAllocator.lookup`` of those keys, every cached
  block verified by its tokens (the hits), or a prompt of its own (a miss at block 0);
- ``admit``: what admission costs a sequence of that prompt with the cache on: keys, tokens
  per block and lookup (``PrefixCaching.match``), then ``retain`` of the hits;
- ``register``: ``register_chain`` of ``--cached`` full blocks after their step;
- ``evict``: one ``allocate`` that evicts ``--cached`` cached blocks.

**Per engine step**: the scheduler's own step (``schedule()``, a stand-in executor that
samples one fixed token per chunk, ``update()``) over ``bench prefix-overhead``'s workload
(``--requests`` distinct prompts of ``--step-prompt`` tokens, ``--max-tokens`` each,
``--concurrency`` in flight, closed loop; the GPU's scheduler defaults), with caching on
and off in turns, ``--rounds`` each: milliseconds per step of schedule and of update, and
the on - off difference, which is what caching adds to every step when nothing is shared.

Markdown on stdout, JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slabserve.bench.decode_step import machine

DEFAULT_OUT = Path("out/prefix-lookup")
BLOCK = 16


@dataclass(frozen=True)
class LookupConfig:
    prompt: int = 16384
    cached: int = 1000
    repeat: int = 9
    requests: int = 32
    step_prompt: int = 4032
    max_tokens: int = 64
    concurrency: int = 8
    rounds: int = 3
    seed: int = 0


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _cached_allocator(tokens: list[int], cached: int):
    """An allocator whose index holds the first ``cached`` blocks of ``tokens``, evictable
    (their sequence finished)."""
    from slabserve.kvcache import BlockAllocator, block_keys, block_tokens

    keys, bt = block_keys(tokens, BLOCK), block_tokens(tokens, BLOCK)
    a = BlockAllocator(cached, 4 * cached, initial_slabs=4, enable_caching=True)
    blocks = a.allocate(cached)
    a.register_chain(blocks, keys[:cached], bt[:cached])
    a.free(reversed(blocks))
    return a


def per_prompt(cfg: LookupConfig) -> dict[str, float]:
    """Milliseconds of each per-prompt operation (module docstring)."""
    from slabserve.kvcache import BlockAllocator, block_keys, block_tokens
    from slabserve.scheduler.api import Request, SamplingParams
    from slabserve.scheduler.prefix import PrefixCaching
    from slabserve.scheduler.sequence import Sequence

    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(1, 100_000, cfg.prompt).tolist()
    other = [0, *tokens[1:]]
    keys, bt = block_keys(tokens, BLOCK), block_tokens(tokens, BLOCK)
    a = _cached_allocator(tokens, cfg.cached)
    assert len(a.lookup(keys, bt)) == cfg.cached and not a.lookup(block_keys(other, BLOCK),
                                                                   block_tokens(other, BLOCK))
    other_keys, other_bt = block_keys(other, BLOCK), block_tokens(other, BLOCK)
    prefix = PrefixCaching(a, BLOCK)
    params = SamplingParams(max_tokens=1)

    def admit() -> None:
        seq = Sequence.from_request(Request("r", tokens, params), 0, 0)
        hits = prefix.match(seq)
        a.retain(hits)
        a.free(reversed(hits))  # back to evictable for the next repeat (not timed apart)

    def register() -> None:
        b = BlockAllocator(cfg.cached, cfg.cached, enable_caching=True)
        fresh = b.allocate(cfg.cached)
        t = time.perf_counter()
        b.register_chain(fresh, keys[:cfg.cached], bt[:cfg.cached])
        spent.append(time.perf_counter() - t)

    def evict() -> None:
        b = _cached_allocator(tokens, cfg.cached)
        b.allocate(3 * cfg.cached)  # the free list first
        t = time.perf_counter()
        b.allocate(cfg.cached)
        spent.append(time.perf_counter() - t)

    out = dict(keys=_median_ms(lambda: block_keys(tokens, BLOCK), cfg.repeat),
               lookup_hit=_median_ms(lambda: a.lookup(keys, bt), cfg.repeat),
               lookup_miss=_median_ms(lambda: a.lookup(other_keys, other_bt), cfg.repeat),
               admit=_median_ms(admit, cfg.repeat))
    for name, fn in (("register", register), ("evict", evict)):
        spent: list[float] = []
        for _ in range(cfg.repeat):
            fn()
        out[name] = 1e3 * statistics.median(spent)
    return out


def _scheduler_run(caching: bool, prompt_sets, cfg: LookupConfig) -> tuple[float, float, int]:
    """Seconds of schedule and of update, and steps, over every set in ``prompt_sets``."""
    from slabserve.engine.step import SampledToken, StepOutput
    from slabserve.kvcache import BlockAllocator
    from slabserve.scheduler.api import Request, SamplingParams
    from slabserve.scheduler.config import SchedulerConfig
    from slabserve.scheduler.scheduler import Scheduler

    need = cfg.concurrency * -(-(cfg.step_prompt + cfg.max_tokens) // BLOCK)
    slab = 256
    alloc = BlockAllocator(slab, -(-need // slab) * slab, enable_caching=caching)
    sched = Scheduler(SchedulerConfig.for_device(True), alloc, BLOCK, 1 << 20, [])
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    t_sched = t_upd = 0.0
    steps = 0
    for r, prompts in enumerate(prompt_sets):
        queue, live = deque(enumerate(prompts)), set()
        while queue or live:
            while queue and len(live) < cfg.concurrency:
                i, p = queue.popleft()
                live.add(f"{r}-{i}")
                sched.add(Request(f"{r}-{i}", p, params))
            t0 = time.perf_counter()
            plan = sched.schedule()
            t1 = time.perf_counter()
            out = StepOutput({c.request_id: SampledToken(7) for c in plan.chunks() if c.sample})
            t2 = time.perf_counter()
            for u in sched.update(plan, out):
                if u.finish_reason is not None:
                    live.discard(u.request_id)
            t3 = time.perf_counter()
            t_sched, t_upd, steps = t_sched + t1 - t0, t_upd + t3 - t2, steps + 1
    sched.check_integrity()
    return t_sched, t_upd, steps


def per_step(cfg: LookupConfig) -> dict[str, dict[str, float]]:
    """Schedule and update milliseconds per step, caching on and off (module docstring)."""
    rng = np.random.default_rng(cfg.seed + 1)
    res: dict[str, list[tuple[float, float, int]]] = {"on": [], "off": []}
    for r in range(cfg.rounds):
        sets = [[tuple(rng.integers(1, 100_000, cfg.step_prompt).tolist())
                 for _ in range(cfg.requests)]]
        for label in ("on", "off") if r % 2 == 0 else ("off", "on"):
            res[label].append(_scheduler_run(label == "on", sets, cfg))
    out = {}
    for label, runs in res.items():
        steps = sum(n for _, _, n in runs)
        out[label] = dict(schedule_ms=1e3 * sum(s for s, _, _ in runs) / steps,
                          update_ms=1e3 * sum(u for _, u, _ in runs) / steps,
                          steps_per_run=steps / len(runs))
    return out


def markdown(cfg: LookupConfig, prompt: dict, step: dict) -> str:
    blocks = cfg.prompt // BLOCK
    lines = [f"Per admitted prompt ({cfg.prompt} tokens, {blocks} full blocks; "
             f"{cfg.cached} blocks cached), median of {cfg.repeat}:", "",
             "| operation | ms | us per block |", "|---|--:|--:|"]
    per = dict(keys=blocks, lookup_hit=cfg.cached, lookup_miss=1, admit=blocks,
               register=cfg.cached, evict=cfg.cached)
    for name, ms in prompt.items():
        lines.append(f"| {name.replace('_', ' ')} | {ms:.3f} | {1e3 * ms / per[name]:.2f} |")
    on, off = step["on"], step["off"]
    lines += ["", f"Per engine step ({cfg.requests} x {cfg.step_prompt}-token prompts, "
              f"{cfg.max_tokens} tokens each, concurrency {cfg.concurrency}; "
              f"{on['steps_per_run']:.0f} steps a run, {cfg.rounds} runs each):", "",
              "| caching | schedule ms | update ms | both ms |", "|---|--:|--:|--:|"]
    for label, x in (("on", on), ("off", off)):
        lines.append(f"| {label} | {x['schedule_ms']:.3f} | {x['update_ms']:.3f} | "
                     f"{x['schedule_ms'] + x['update_ms']:.3f} |")
    extra = on["schedule_ms"] + on["update_ms"] - off["schedule_ms"] - off["update_ms"]
    lines.append(f"| on - off | | | **{extra:.3f}** |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> tuple[LookupConfig, Path]:
    ap = argparse.ArgumentParser(prog="slabserve bench prefix-lookup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LookupConfig()
    for name in ("prompt", "cached", "repeat", "requests", "step_prompt", "max_tokens",
                 "concurrency", "rounds", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    cfg = LookupConfig(a.prompt, a.cached, a.repeat, a.requests, a.step_prompt, a.max_tokens,
                       a.concurrency, a.rounds, a.seed)
    if cfg.cached * BLOCK > cfg.prompt or min(cfg.cached, cfg.repeat, cfg.rounds) < 1:
        ap.error("need 1 <= --cached <= prompt / 16, --repeat >= 1 and --rounds >= 1")
    return cfg, a.out


def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(sys.argv[1:] if argv is None else list(argv))
    prompt, step = per_prompt(cfg), per_step(cfg)
    md = markdown(cfg, prompt, step)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(config=asdict(cfg), machine=machine(),
                command=" ".join(["slabserve bench prefix-lookup", *(argv or [])]))
    (out / "prefix-lookup.json").write_text(json.dumps(dict(meta=meta, per_prompt=prompt,
                                                            per_step=step), indent=1))
    (out / "prefix-lookup.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

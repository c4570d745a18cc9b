"""``slabserve bench prefix-lookup``: the host cost of automatic prefix caching, no model.

Pure Python (the allocator, the prefix index and the scheduler; no MLX), so it runs alike on
every machine.  Two parts:

**Per admitted prompt** (``--prompt`` tokens, default 16,384; ``--cached`` blocks cached,
default 1,000, all of them the prompt's first blocks, evictable): the median over
``--repeat`` timings of

- ``keys``: the hash chain of the prompt's full blocks (``block_keys``);
- ``lookup hit`` / ``lookup miss``: ``BlockAllocator.lookup`` of those keys, every cached
  block verified by its tokens (the hits), or a prompt of its own (a miss at block 0);
- ``admit``: what admission costs a new sequence of that prompt with the cache on: keys,
  tokens per block and lookup (``PrefixCaching.match``), then ``retain`` of the hits;
- ``register``: ``register_chain`` of ``--cached`` full blocks after their step;
- ``evict``: one ``allocate`` that evicts ``--cached`` cached blocks.

**Per engine step**: the scheduler's own step (``schedule()``, a stand-in executor that
samples one fixed token per chunk, ``update()``) over ``bench prefix-overhead``'s workload
and closed loop (its ``EngineRun``: ``--requests`` distinct prompts of ``--step-prompt``
tokens, ``--max-tokens`` each, ``--concurrency`` in flight; the GPU's scheduler defaults),
caching on and off in lockstep, ``--rounds`` rounds: milliseconds per step of schedule and
of update, and the on - off difference, which is what caching adds to every step when
nothing is shared.

Markdown on stdout, JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slabserve.bench.decode_step import machine
from slabserve.bench.prefix_overhead import SETTINGS, EngineRun, Stack, lockstep

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


def _median_ms(timed, repeat: int) -> float:
    """Median milliseconds over ``repeat`` calls of ``timed``, which returns the seconds
    of the part it times (setup and clean-up stay off the clock)."""
    return 1e3 * statistics.median(timed() for _ in range(repeat))


def _clock(fn) -> Callable[[], float]:
    """``fn`` timed whole."""
    def timed() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return timed


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
    other_keys, other_bt = block_keys(other, BLOCK), block_tokens(other, BLOCK)
    a = _cached_allocator(tokens, cfg.cached)
    assert len(a.lookup(keys, bt)) == cfg.cached and not a.lookup(other_keys, other_bt)
    prefix = PrefixCaching(a, BLOCK)
    params = SamplingParams(max_tokens=1)

    def admit() -> float:
        seq = Sequence.from_request(Request("r", tokens, params), 0, 0)
        t = time.perf_counter()
        hits = prefix.match(seq)
        a.retain(hits)
        spent = time.perf_counter() - t
        a.free(reversed(hits))  # evictable again for the next repeat
        return spent

    def register() -> float:
        b = BlockAllocator(cfg.cached, cfg.cached, enable_caching=True)
        fresh = b.allocate(cfg.cached)
        t = time.perf_counter()
        b.register_chain(fresh, keys[:cfg.cached], bt[:cfg.cached])
        return time.perf_counter() - t

    def evict() -> float:
        b = _cached_allocator(tokens, cfg.cached)
        b.allocate(3 * cfg.cached)  # the free list first
        t = time.perf_counter()
        b.allocate(cfg.cached)
        return time.perf_counter() - t

    ops = dict(keys=_clock(lambda: block_keys(tokens, BLOCK)),
               lookup_hit=_clock(lambda: a.lookup(keys, bt)),
               lookup_miss=_clock(lambda: a.lookup(other_keys, other_bt)),
               admit=admit, register=register, evict=evict)
    return {name: _median_ms(timed, cfg.repeat) for name, timed in ops.items()}


class _FixedToken:
    """A stand-in executor: token 7 for every chunk that samples, no model."""

    last_forward_s = 0.0

    def execute(self, plan):
        from slabserve.engine.step import SampledToken, StepOutput

        return StepOutput({c.request_id: SampledToken(7) for c in plan.chunks() if c.sample})

    def release(self, request_id: str) -> None:
        pass


def _stack(label: str, cfg: LookupConfig):
    """A scheduler over a fresh allocator (caching on or off) room for ``concurrency``
    whole sequences in 256-block slabs, and the stand-in executor."""
    from slabserve.kvcache import BlockAllocator
    from slabserve.scheduler.config import SchedulerConfig
    from slabserve.scheduler.scheduler import Scheduler

    need = cfg.concurrency * -(-(cfg.step_prompt + cfg.max_tokens) // BLOCK)
    slab = 256
    alloc = BlockAllocator(slab, -(-need // slab) * slab, enable_caching=label == "on")
    sched = Scheduler(SchedulerConfig.for_device(True), alloc, BLOCK, 1 << 20, [])
    return Stack(label, None, _FixedToken(), sched)


def per_step(cfg: LookupConfig) -> dict[str, dict[str, float]]:
    """Schedule and update milliseconds per step, caching on and off (module docstring)."""
    rng = np.random.default_rng(cfg.seed + 1)
    traces: dict[str, list] = {s: [] for s in SETTINGS}
    for r in range(cfg.rounds):
        prompts = [tuple(rng.integers(1, 100_000, cfg.step_prompt).tolist())
                   for _ in range(cfg.requests)]
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        runs = [EngineRun(_stack(s, cfg), prompts, f"{s}-r{r}", cfg.concurrency,
                          cfg.max_tokens) for s in order]
        lockstep(runs)
        for run in runs:
            run.st.scheduler.check_integrity()
            traces[run.st.label].append(run.trace)
    out = {}
    for label, trs in traces.items():
        steps = sum(len(t.schedule) for t in trs)
        out[label] = dict(schedule_ms=1e3 * sum(sum(t.schedule) for t in trs) / steps,
                          update_ms=1e3 * sum(sum(t.update) for t in trs) / steps,
                          steps_per_run=steps / len(trs))
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

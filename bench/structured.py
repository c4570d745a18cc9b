"""``slabserve bench structured``: what a JSON-schema constraint adds to a decode step.

For an embedded random-weight model (``--embedded NAME[:DTYPE]``, default the Qwen2.5-0.5B
shape), each batch ``B`` of ``--batches``: ``B`` requests with the same prompt decode
``--max-tokens`` tokens through the real scheduler and ``ModelExecutor.execute`` (driven
step by step on this thread, as the engine thread does), once unconstrained and once
constrained by ``SCHEMA`` (a nested object: strings with maxLength, an integer range, an
array, an enum), alternating which goes first each of ``--rounds`` rounds.

Per step of a full batch (``B`` decodes, no prefill): the whole ``execute`` time; for
constrained steps also the mask worker's time (llguidance masks for every row plus the
closing-path upkeep, on a worker thread while the forward runs), the time the step still
waited for the masks after the forward, and the commit (each grammar consumes its token;
near the end a sampled token is checked against the budget).  Steps are compared at the
same output positions (the constrained requests end early: the grammar closes them).
Every constrained output is checked against the schema (``jsonschema``).

Markdown on stdout; JSON and markdown under ``--out`` (default out/structured).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUT = Path("out/structured")
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 48},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "maxItems": 4},
        "author": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "email": {"type": "string", "maxLength": 32}},
            "required": ["name", "email"], "additionalProperties": False},
        "rating": {"enum": ["low", "mid", "high"]},
    },
    "required": ["title", "year", "tags", "author", "rating"],
    "additionalProperties": False,
}
PROMPT = "Describe a book as JSON with its title, year, tags, author and rating."


@dataclass
class StepTimes:
    """Per full-batch step, by output position: seconds."""

    execute: dict[int, list[float]] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)

    def add(self, pos: int, dt: float, ex) -> None:
        self.execute.setdefault(pos, []).append(dt)
        self.steps.append(dt)
        self.forward.append(ex.last_forward_s)
        self.mask.append(ex.last_mask_s)
        self.wait.append(ex.last_mask_wait_s)
        self.commit.append(ex.last_commit_s)


def run_batch(loop, batch: int, max_tokens: int, constrained: bool, seed: int,
              times: StepTimes) -> list[tuple[str, str]]:
    """Decode one batch to the end; (finish reason, text) per request."""
    from slabserve.scheduler.api import GrammarSpec, Request, SamplingParams

    sched, ex, tok = loop.scheduler, loop.executor, loop.tokenizer
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA)) if constrained else None
    if spec is not None:
        ex.check_constraint(spec)
    prompt = tuple(tok.encode(PROMPT))
    for i in range(batch):
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i,
                                ignore_eos=not constrained, constraint=spec)
        sched.add(Request(f"{'c' if constrained else 'f'}{seed}-{i}", prompt, params))
    outs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while sched.has_work:
        plan = sched.schedule()
        t0 = time.perf_counter()
        result = ex.execute(plan)
        dt = time.perf_counter() - t0
        if len(plan.decodes) == batch and not plan.prefills:
            times.add(plan.decodes[0].output_index, dt, ex)
        for upd in sched.update(plan, result):
            outs.setdefault(upd.request_id, []).append(upd.token.token_id)
            if upd.finish_reason is not None:
                reasons[upd.request_id] = upd.finish_reason
                ex.release(upd.request_id)
    return [(reasons[r], tok.decode(ids)) for r, ids in outs.items()]


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values) if values else float("nan")


def compare(free: StepTimes, cons: StepTimes) -> dict:
    """Medians over the output positions both modes have (constrained requests end
    earlier), position 0 excepted (the first decode after a prefill).  ``outside``: the
    step less its forward (sampling, mask wait, commit): the constraint's own cost,
    apart from the forward's run-to-run spread on a shared machine."""
    common = set(free.execute) & set(cons.execute) - {0}
    f = [t for p in sorted(common) for t in free.execute[p]]
    c = [t for p in sorted(common) for t in cons.execute[p]]
    mf, mc = median_ms(f), median_ms(c)
    mask, wait = median_ms(cons.mask), median_ms(cons.wait)
    out_f = median_ms([e - fw for e, fw in zip(free.steps, free.forward, strict=True)])
    out_c = median_ms([e - fw for e, fw in zip(cons.steps, cons.forward, strict=True)])
    return {"positions": len(common), "free_ms": mf, "constrained_ms": mc,
            "added_pct": 100 * (mc - mf) / mf if f and c else float("nan"),
            "forward_free_ms": median_ms(free.forward), "forward_ms": median_ms(cons.forward),
            "outside_free_ms": out_f, "outside_ms": out_c,
            "outside_added_pct": 100 * (out_c - out_f) / mf if f else float("nan"),
            "mask_ms": mask, "mask_wait_ms": wait, "commit_ms": median_ms(cons.commit),
            "hidden_pct": 100 * (1 - wait / mask) if mask > 0 else float("nan")}


def validate(outputs: list[tuple[str, str]]) -> tuple[int, int, int]:
    """(outputs, valid against SCHEMA, finished with stop)."""
    import jsonschema

    valid = 0
    for _, text in outputs:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return len(outputs), valid, sum(r == "stop" for r, _ in outputs)


def table(rows: list[dict], title: str) -> str:
    head = ("| B | unconstrained ms/step | constrained ms/step | added | forward ms "
            "(unc. / con.) | step less forward ms (unc. / con.) | added outside the forward | "
            "mask work ms | mask wait ms | commit ms | mask hidden | valid / outputs |\n"
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    lines = [f"### {title}", "", head]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['free_ms']:.1f} | {r['constrained_ms']:.1f} | "
            f"{r['added_pct']:+.1f}% | {r['forward_free_ms']:.1f} / {r['forward_ms']:.1f} | "
            f"{r['outside_free_ms']:.2f} / {r['outside_ms']:.2f} | "
            f"{r['outside_added_pct']:+.1f}% | {r['mask_ms']:.3f} | {r['mask_wait_ms']:.3f} | "
            f"{r['commit_ms']:.3f} | {r['hidden_pct']:.0f}% | {r['valid']} / {r['outputs']} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slabserve bench structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedded", default="qwen2.5-0.5b", help="NAME[:DTYPE]")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from slabserve import env
    from slabserve.build import ServeConfig, build_serving
    from slabserve.engine.config import CacheConfig
    from slabserve.scheduler.config import SchedulerConfig

    args = parse_args(argv)
    name, _, dtype = args.embedded.partition(":")
    batches = [int(b) for b in args.batches.split(",")]
    loop = build_serving(ServeConfig(
        model=f"embedded:{name}", dtype=dtype or "float32", cache_dir=env.cache_dir(),
        cache=CacheConfig(kv_budget_bytes=1 << 30),
        scheduler=SchedulerConfig(max_running=max(batches))))
    rows = []
    for batch in batches:
        free, cons, outputs = StepTimes(), StepTimes(), []
        run_batch(loop, batch, 8, False, 0, StepTimes())  # warm-up: compile, caches
        for r in range(args.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                got = run_batch(loop, batch, args.max_tokens, constrained, 100 * r,
                                cons if constrained else free)
                if constrained:
                    outputs += got
        n, valid, stopped = validate(outputs)
        rows.append({"batch": batch, **compare(free, cons), "outputs": n, "valid": valid,
                     "stopped": stopped})
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}"
    title = f"{name} ({dtype or 'float32'}), max_tokens {args.max_tokens}, {machine}"
    md = table(rows, title)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.md").write_text(md + "\n")
    (args.out / "structured.json").write_text(json.dumps(
        {"model": name, "dtype": dtype or "float32", "machine": machine, "schema": SCHEMA,
         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0 if all(r["valid"] == r["outputs"] for r in rows) else 1


__all__ = ["SCHEMA", "StepTimes", "main"]

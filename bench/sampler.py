"""``slabserve bench sampler``: one batch's sampling, eager (``engine.sampling.draw``)
against the compiled sampler (``engine.sampling_graph``), no model.

Per cell (batch x parameter set): random float32 logits ``[B, --vocab]`` (the
default is Llama-3.2's vocabulary), then ``--repeat`` rounds, each timing both modes in
turn (the order alternating) from the call to the tokens on the host: the host building
the graph plus the device running it, what a decode step adds after the forward.  The
token index moves every round (new Gumbel keys), so no two rounds draw the same.  Every
round checks that both modes sampled the same tokens (``match``).  The first
``--warmup`` rounds (traces, kernel compilation) are not timed.

Parameter sets: ``greedy`` (temperature 0: both modes run the eager argmax, the
compiled sampler takes batches with random rows or processors), ``temperature`` (0.8),
``top_p`` (0.7, top_p 0.95), ``filters`` (0.8, top_k 40, top_p 0.9, min_p 0.05),
``logprobs`` (0.8 with 5 top logprobs), ``penalties`` (0.8, repetition 1.1, presence 0.5,
frequency 0.3, three logit_bias entries).  Every row has a random history of
``--prompt-tokens`` prompt and ``--output-tokens`` output tokens (only penalties read
it).  Markdown on stdout, JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from slabserve.engine.sampling import RowSpec, draw
from slabserve.engine.sampling_graph import CompiledSampler
from slabserve.engine.step import SamplingParams

PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top_p": SamplingParams(temperature=0.7, top_p=0.95),
    "filters": SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
    "logprobs": SamplingParams(temperature=0.8, logprobs=5),
    "penalties": SamplingParams(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5,
                                frequency_penalty=0.3,
                                logit_bias=((13, 2.0), (42, -1.5), (1000, -100.0))),
}


def _timed(x: mx.array, specs, sampler) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    picked = draw(x, specs, None, sampler, min_rows=1).host()
    return time.perf_counter() - t0, [t for t, _ in picked]


def run_cell(batch: int, name: str, vocab: int, repeat: int, warmup: int, seed: int,
             history: tuple[int, int] = (0, 0)) -> dict:
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(0, 3, size=(batch, vocab)).astype(np.float32))
    mx.eval(x)
    hist = [tuple(tuple(rng.integers(0, vocab, n).tolist()) for n in history)
            for _ in range(batch)]
    sampler = CompiledSampler()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    match = True
    for r in range(warmup + repeat):
        specs = [RowSpec(PARAMS[name], seed + i, *hist[i], r) for i in range(batch)]
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        tokens = {}
        for mode in order:
            dt, tokens[mode] = _timed(x, specs, sampler if mode == "compiled" else None)
            if r >= warmup:
                times[mode].append(dt)
        match = match and tokens["eager"] == tokens["compiled"]
    eager, compiled = (statistics.median(times[m]) * 1e3 for m in ("eager", "compiled"))
    return {"batch": batch, "params": name, "eager_ms": eager, "compiled_ms": compiled,
            "ratio": compiled / eager, "match": match}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench sampler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--params", default=",".join(PARAMS))
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    names = a.params.split(",")
    if any(n not in PARAMS for n in names):
        ap.error(f"--params must be among {','.join(PARAMS)}")
    print(f"device {mx.default_device()}, vocab {a.vocab}, history {a.prompt_tokens} + "
          f"{a.output_tokens} tokens, median of {a.repeat} rounds\n")
    print("| B | params | eager ms | compiled ms | compiled / eager | same tokens |")
    print("|--:|---|--:|--:|--:|---|", flush=True)
    rows = []
    for b in a.batches.split(","):
        for n in names:
            r = run_cell(int(b), n, a.vocab, a.repeat, a.warmup, a.seed,
                         (a.prompt_tokens, a.output_tokens))
            rows.append(r)
            print(f"| {r['batch']} | {r['params']} | {r['eager_ms']:.3f} | "
                  f"{r['compiled_ms']:.3f} | {r['ratio']:.2f} | "
                  f"{'yes' if r['match'] else 'NO'} |", flush=True)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sampler.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["match"] for r in rows) else 1

"""Linear layout (engine/linear_layout.py) on vs off through the real ``ModelRunner``, side by
side in one run.

``slabserve bench linear-layout`` (the launcher preloads OpenBLAS, as for the server; a bare
``python -m slabserve.bench.linear_layout`` needs ``LD_PRELOAD`` set to libopenblas by hand).

The model is loaded twice (layout off, layout on: twice its weights in memory, ~4 GB for
Qwen2.5-0.5B in float32), then, interleaved off / on:
1. one decode step of ``--decodes`` sequences (each count) at ``--context`` tokens;
2. one prefill of a ``--prompt``-token prompt in ``--chunk``-token chunks (what the layout
   costs or saves where products have many rows, and the embedding lookups gather columns).
Host math is left as the environment says (on by default) for both.
"""

from __future__ import annotations

import argparse
import random
import statistics

import mlx.core as mx
from slabserve.bench.host_math import decode_s, interleaved, prefill_s, print_prefill_runs
from slabserve.bench.step_overhead import add_runner_args, allocate_tokens
from slabserve.engine.config import CacheConfig
from slabserve.engine.runner import ModelRunner, SeqInput


def load_pair(a) -> dict[str, ModelRunner]:
    from slabserve.engine.loader import load

    from slabserve.mlxmem import configure_memory

    configure_memory(None)
    runners = {}
    for mode, on in (("off", False), ("on", True)):
        model, _, _ = load(a.model, a.dtype)
        cache = CacheConfig(block_size=16, kv_budget_bytes=a.kv_gib << 30)
        runners[mode] = ModelRunner(model, cache, linear_layout=on)
        d = runners[mode].linear_layout
        print(f"layout {mode}: {d.reason.value}, {d.linears} linear, {d.embeddings} embedding, "
              f"{d.bytes / 1e6:.0f} MB", flush=True)
    return runners


def decode_table(runners: dict[str, ModelRunner], a) -> None:
    rng = random.Random(0)
    print(f"\none decode step at {a.context} tokens ({a.decode_reps} runs each, interleaved)")
    print("| sequences | layout off ms | layout on ms | speed-up | off runs | on runs |")
    print("|--:|--:|--:|--:|---|---|")
    for count in (int(x) for x in a.decodes.split(",")):
        seqs = {}
        for mode, r in runners.items():
            vocab = r.model.args.vocab_size
            seqs[mode] = [SeqInput([rng.randrange(vocab)], a.context,
                                   allocate_tokens(r, a.context + 1)) for _ in range(count)]
        steps = interleaved({m: lambda r=r, s=seqs[m]: decode_s(r, s)
                             for m, r in runners.items()}, a.decode_reps)
        off, on = (1e3 * statistics.median(steps[m]) for m in ("off", "on"))
        print(f"| {count} | {off:.1f} | {on:.1f} | {off / on:.2f}x | "
              + " | ".join(", ".join(f"{1e3 * t:.0f}" for t in steps[m])
                           for m in ("off", "on"))
              + " |", flush=True)
        for mode, r in runners.items():
            for s in seqs[mode]:
                r.allocator.free(s.blocks)


def prefill_table(runners: dict[str, ModelRunner], a) -> None:
    rng = random.Random(1)
    vocab = runners["off"].model.args.vocab_size
    tokens = [rng.randrange(vocab) for _ in range(a.prompt)]
    tables = {m: allocate_tokens(r, a.prompt) for m, r in runners.items()}
    runs = interleaved({m: lambda r=r, m=m: prefill_s(r, tokens, tables[m], a.chunk)
                        for m, r in runners.items()}, a.prefill_reps)
    print(f"\none {a.prompt}-token prefill in {a.chunk}-token chunks ({a.prefill_reps} runs "
          "each, interleaved)")
    print_prefill_runs("layout", runs, a.prompt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench linear-layout")
    add_runner_args(ap, dtype="float32", kv_gib=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decodes", default="1,8", help="sequences per decode step")
    ap.add_argument("--decode-reps", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--prefill-reps", type=int, default=2, help="0 skips the prefill table")
    a = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"MLX {mx.__version__}, {a.model} {a.dtype}")
    runners = load_pair(a)
    decode_table(runners, a)
    if a.prefill_reps:
        prefill_table(runners, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

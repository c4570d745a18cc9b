"""Graph nodes of one engine forward, per layer: what the host pays for per step.

``python -m slabserve.bench.graph_nodes --model embedded:qwen2.5-0.5b --batch 8``

On a GPU each MLX graph node costs host time to encode (~10-14 us measured on an H200:
``bench.cuda_kernel``'s tiny-op overhead), which is most of a decode step there
(docs/adr/0007).  This builds one batched decode forward and one prefill chunk with
``ModelRunner.forward`` but does not evaluate them, exports the graph
(``mx.export_to_dot``) and counts its nodes by primitive.  On the CPU MLX expands its fast
ops (rms_norm, rope, SDPA) into primitives at graph build, so absolute counts are higher
than on a GPU; differences between two versions of our own code carry over.
"""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter

import mlx.core as mx
from slabserve.bench.step_overhead import (
    add_runner_args,
    allocate_tokens,
    eval_replaced,
    load_runner,
)
from slabserve.engine.runner import SeqInput


def count(runner, prefills, decodes) -> Counter:
    """Nodes by primitive name of the graph ``runner.forward`` would evaluate."""
    captured = {}
    with eval_replaced(lambda _real, *args: captured.setdefault("args", args)):
        runner.forward(prefills, decodes)
    outs, pending = captured["args"]
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs, *pending)
    return Counter(re.findall(r'label ?= ?"([A-Za-z]+)', buf.getvalue()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.bench.graph_nodes")
    add_runner_args(ap, dtype="float32", kv_gib=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    runner = load_runner(a)[0]
    layers = runner.geom.num_layers
    tables = [allocate_tokens(runner, a.ctx + a.chunk + 1) for _ in range(a.batch + 1)]
    for t in tables:
        runner.forward([SeqInput(list(range(a.ctx)), 0, t, want_logits=False)], [])
    decodes = [SeqInput([5], a.ctx, t) for t in tables[:-1]]
    chunk = SeqInput(list(range(a.chunk)), a.ctx, tables[-1])
    for name, pre, dec in (("decode", [], decodes), ("prefill chunk", [chunk], [])):
        c = count(runner, pre, dec)
        total = sum(c.values())
        top = ", ".join(f"{k} {v}" for k, v in c.most_common(a.top))
        print(f"{name}: {total} nodes, {total / layers:.1f} per layer ({layers} layers); {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

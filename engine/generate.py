"""Greedy generation straight on the runner, without the scheduler: prefill each prompt
in chunks, then decode all prompts as one ragged batch.  Used by tests and ``bench``."""

from __future__ import annotations

import mlx.core as mx

from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.kvcache import blocks_needed


def _ensure(runner: ModelRunner, table: list[int], num_tokens: int) -> None:
    need = blocks_needed(num_tokens, runner.block_size) - len(table)
    if need > 0:
        got = runner.allocator.allocate(need)
        if got is None:
            raise MemoryError(f"KV pool exhausted: {need} more blocks needed")
        table.extend(got)


def greedy_generate(
    runner: ModelRunner, prompts: list[list[int]], max_tokens: int, chunk: int = 512
) -> list[list[int]]:
    """``max_tokens`` greedy tokens for each prompt; blocks are freed before returning."""
    tables: list[list[int]] = [[] for _ in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    try:
        for i, p in enumerate(prompts):
            for s in range(0, len(p), chunk):
                part = p[s : s + chunk]
                _ensure(runner, tables[i], s + len(part))
                last = s + len(part) == len(p)
                pre, _ = runner.forward([SeqInput(part, s, tables[i], want_logits=last)], [])
            outs[i].append(int(mx.argmax(pre[0]).item()))
        for _ in range(max_tokens - 1):
            seqs = []
            for i, p in enumerate(prompts):
                pos = len(p) + len(outs[i]) - 1
                _ensure(runner, tables[i], pos + 1)
                seqs.append(SeqInput([outs[i][-1]], pos, tables[i]))
            _, logits = runner.forward([], seqs)
            for i, t in enumerate(mx.argmax(logits, axis=-1).tolist()):
                outs[i].append(t)
    finally:
        for t in tables:
            runner.allocator.free(t)
    return outs

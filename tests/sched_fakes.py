"""A fake executor for scheduler tests: a shadow KV store of token ids.

Each chunk writes its token ids into the (block, row) slots of its table; a sampled token
is a hash of the tokens read back through the table for all positions so far.  So a
wrong block table, a block shared by two sequences, or a recompute that feeds the wrong
tokens changes the sampled tokens, and outputs must not depend on the schedule.
``drive`` runs a scheduler and an executor in the engine thread's order with async
scheduling.
"""

from __future__ import annotations

from slabserve.engine.step import Executor, SampledToken, StepOutput, StepPlan
from slabserve.kvcache import BlockAllocator
from slabserve.scheduler.api import Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.scheduler import Scheduler

EOS = 0
VOCAB = 50


def next_token(context: list[int]) -> int:
    h = 1469598103934665603
    for t in context:
        h = ((h ^ t) * 1099511628211) & ((1 << 64) - 1)
    return 1 + h % (VOCAB - 1)  # never EOS: tests add EOS by stop ids when they want


class ShadowExecutor(Executor):
    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.kv: dict[tuple[int, int], int] = {}
        self.max_context = 1 << 20

    def execute(self, plan: StepPlan) -> StepOutput:
        bs = self.block_size
        sampled = {}
        for c in plan.chunks():
            for i, t in enumerate(c.tokens):
                p = c.start + i
                self.kv[(c.blocks[p // bs], p % bs)] = t
        for c in plan.chunks():
            if c.sample:
                end = c.start + len(c.tokens)
                ctx = [self.kv[(c.blocks[p // bs], p % bs)] for p in range(end)]
                sampled[c.request_id] = SampledToken(next_token(ctx))
        return StepOutput(sampled)


def reference(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    ctx, out = list(prompt), []
    for _ in range(max_tokens):
        t = next_token(ctx)
        out.append(t)
        ctx.append(t)
    return out


def make(num_blocks: int = 16, block_size: int = 4, max_context: int = 10_000,
         slab_blocks: int | None = None, caching: bool = False,
         **cfg) -> tuple[Scheduler, ShadowExecutor]:
    """A scheduler over a fresh allocator (``caching``: automatic prefix caching on) and
    the shadow executor.  The shadow KV store checks sharing too: a shared block holding
    other tokens changes every later sampled token."""
    alloc = BlockAllocator(slab_blocks or num_blocks, num_blocks, enable_caching=caching)
    s = Scheduler(SchedulerConfig(**cfg), alloc, block_size, max_context, eos_token_ids={EOS})
    return s, ShadowExecutor(alloc, block_size)


def req(rid: str, n: int, max_tokens: int = 4, base: int = 1, **params) -> Request:
    prompt = tuple(base + (i * 7) % (VOCAB - 1) for i in range(n))
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))


def drive(s, ex) -> tuple[dict[str, list[int]], dict[str, str], int]:
    """The engine thread's order with async scheduling, checking integrity after every
    update: (tokens per request, finish reason per request, steps planned ahead)."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    inflight, ahead = None, 0
    while s.has_work or inflight is not None:
        plan = inflight
        if plan is None:
            plan = s.schedule()
            ex.submit(plan)
        inflight = s.schedule_next(plan)
        if inflight is not None:
            ahead += 1
            ex.submit(inflight)
        for u in s.update(plan, ex.collect(plan)):
            tokens.setdefault(u.request_id, []).append(u.token.token_id)
            if u.finish_reason:
                reasons[u.request_id] = u.finish_reason
        s.check_integrity()
    return tokens, reasons, ahead

"""Continuous-batching scheduler: pure Python around plain data, no MLX.

Each step: ``schedule() -> StepPlan``, the executor runs it, then ``update(plan, out)``.
With async scheduling, ``schedule_next(plan)`` plans a pure-decode step while ``plan``
still runs (its tokens ``PENDING``), and the updates follow in step order.

There is no prefill phase or decode phase.  Every running sequence has ``num_pending``
tokens that are known but have no K/V yet (1 when decoding; more for a new prompt or a
recompute after preemption).  A step feeds, within ``max_step_tokens``:

  1. one token for every decoding sequence, oldest first;
  2. a chunk (at most ``prefill_chunk`` tokens) of every prefilling running sequence;
  3. chunks of waiting sequences, admitted first-come first-served while
     ``max_running`` allows and the pool can hold their first chunk plus
     ``watermark_blocks`` (head-of-line blocking: no overtaking); none in a step
     that had to preempt.

Blocks come from the ``BlockAllocator``; ``allocate`` returning None means "preempt":
the newest running sequence (by arrival) gives all its blocks back and goes to the front
of the queue; it resumes later by recomputing ``prompt + output`` (so, by arrival order,
older requests never lose their blocks to newer ones).  A request that could not fit
even alone is refused at ``add`` (``kv_capacity``), so a lone sequence always fits.

Prefix caching (scheduler/prefix.py): an admitted sequence starts past the longest
cached prefix of its tokens, sharing those blocks; cached blocks no sequence holds are
evicted (least recently used) before any running sequence is preempted.

Invariants (``check_integrity``): the allocator's own; each used block's refcount is the
number of live sequences holding it (shared only through the prefix cache), and used
blocks are exactly those held; a running sequence's table covers its
computed tokens; a waiting sequence holds no blocks and has nothing computed.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from slabserve.engine.step import (
    PENDING,
    SampledToken,
    SamplingParams,
    ScheduledChunk,
    StepOutput,
    StepPlan,
)
from slabserve.kvcache import BlockAllocator, blocks_needed
from slabserve.scheduler.api import FinishReason, Request, RequestError
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.prefix import PrefixCaching
from slabserve.scheduler.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SeqUpdate:
    """What ``update`` reports per sequence: a new token (or none) and whether it finished."""

    request_id: str
    token: SampledToken | None
    finish_reason: FinishReason | None = None
    error: str | None = None
    cached_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        allocator: BlockAllocator,
        block_size: int,
        max_context: int,
        eos_token_ids: Iterable[int] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.allocator = allocator
        self.block_size = block_size
        self.max_context = min(max_context, cfg.max_context or max_context)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._rng = rng or random.Random()
        self.running: list[Sequence] = []  # sorted by arrival
        self.waiting: deque[Sequence] = deque()
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self._step = 0
        self.preemptions = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefix = PrefixCaching(allocator, block_size)

    # ---- requests -----------------------------------------------------------------
    def validate(self, req: Request) -> None:
        """Raise ``RequestError`` if ``req`` can never run (independent of load)."""
        n, mt = len(req.prompt_tokens), req.params.max_tokens
        if n == 0:
            raise RequestError("invalid", "prompt is empty", "prompt")
        if n >= self.max_context:
            raise RequestError(
                "too_long", f"prompt has {n} tokens; the context limit is {self.max_context}",
                "prompt")
        if n + mt > self.max_context:
            raise RequestError(
                "too_long", f"prompt ({n}) + max_tokens ({mt}) exceeds the context limit "
                f"({self.max_context})", "max_tokens")
        need = blocks_needed(n + mt - 1, self.block_size)
        if need > self.allocator.max_blocks:
            raise RequestError(
                "kv_capacity", f"needs {need} KV blocks; the pool holds at most "
                f"{self.allocator.max_blocks} blocks of {self.block_size} tokens", "max_tokens")

    def add(self, req: Request, enforce_queue_limit: bool = True) -> None:
        """Queue ``req``; ``RequestError`` if it is invalid, too long, or the queue is full
        (the async front checks the queue limit itself, counting requests in flight)."""
        self.validate(req)
        if req.request_id in self._seqs:
            raise RequestError("invalid", f"duplicate request id {req.request_id!r}")
        if enforce_queue_limit and len(self.waiting) >= self.cfg.max_queued:
            raise RequestError("queue_full", f"{len(self.waiting)} requests already queued")
        seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence.from_request(req, self._arrivals, seed)
        self._arrivals += 1
        self._seqs[seq.request_id] = seq
        self.waiting.append(seq)
        self.prompt_tokens += len(seq.prompt)

    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """End a live request now (abort, stop string): frees its blocks.  None if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        return seq

    def abort(self, request_id: str) -> bool:
        return self.finish(request_id, "abort") is not None

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- planning -----------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step (see the module docstring).  Never returns an empty plan
        while sequences are running, unless the budget is zero."""
        self._step += 1
        state = _Planning(self.cfg.max_step_tokens)
        self._plan_decodes(state)
        self._plan_prefills(state)
        self._admit(state)
        while not state.decodes and not state.prefills and len(self.running) > 1:
            state.preempted.append(self._preempt(self.running[-1]))
            self._plan_prefills(state)
        return StepPlan(self._step, tuple(state.prefills), tuple(state.decodes),
                        tuple(state.preempted))

    def schedule_next(self, plan: StepPlan) -> StepPlan | None:
        """Plan the step after ``plan`` while ``plan`` runs, before ``update(plan)``
        (async scheduling): every running sequence decodes once more, fed the token
        ``plan`` samples for it (``PENDING``: the executor reads it on the device).

        None (plan after ``update`` instead) when the next step depends on what only
        ``plan``'s tokens tell or needs what this cannot do: a prefill in ``plan``, a
        waiting request with room to run (``max_running`` not reached; when it is, a
        request that ``plan`` ends makes room one step later than without async
        scheduling), a running sequence ``plan`` does not decode, a row whose grammar
        mask or penalties need its history, or blocks only a preemption would free.  A
        sequence that ``plan`` ends by length is left out; one it ends by eos or a stop
        string runs once more and ``update`` drops that token (one wasted row)."""
        if plan.prefills or not plan.decodes:
            return None
        if self.waiting and len(self.running) < self.cfg.max_running:
            return None  # it may be admitted now: plan after the update
        decoding = {c.request_id: c for c in plan.decodes}
        nxt: list[tuple[Sequence, ScheduledChunk]] = []
        for seq in self.running:
            c = decoding.get(seq.request_id)
            if c is None or not c.sample or not _history_free(seq.params):
                return None
            ends = c.output_index + 1 >= seq.params.max_tokens or c.start + 2 >= self.max_context
            if not ends:
                nxt.append((seq, c))
        extras = [blocks_needed(c.start + 2, self.block_size) - len(s.blocks) for s, c in nxt]
        if not nxt or sum(e for e in extras if e > 0) > self.allocator.num_available:
            return None
        self._step += 1
        chunks = []
        for (seq, c), extra in zip(nxt, extras, strict=True):
            if extra > 0:
                seq.blocks.extend(self.allocator.allocate(extra))
            chunks.append(ScheduledChunk(seq.request_id, (PENDING,), c.start + 1,
                                         tuple(seq.blocks), True, seq.params, seed=seq.seed,
                                         output_index=c.output_index + 1))
        return StepPlan(self._step, decodes=tuple(chunks))

    def _plan_decodes(self, st: _Planning) -> None:
        i = 0
        while i < len(self.running) and st.budget > 0:
            seq = self.running[i]
            if seq.num_pending != 1:
                i += 1
                continue
            if not self._reserve(seq, 1):
                victim = self.running[-1]
                st.preempted.append(self._preempt(victim))
                continue  # retry seq (or, if it was the victim, its successor)
            st.add(self._chunk(seq, 1))
            i += 1

    def _plan_prefills(self, st: _Planning) -> None:
        for seq in self.running:
            if st.budget <= 0:
                return
            if seq.num_pending <= 1 or seq.request_id in st.planned:
                continue
            fit = (len(seq.blocks) + self.allocator.num_available) * self.block_size
            n = self._chunk_len(seq.num_pending, min(st.budget, fit - seq.num_computed), st)
            if n <= 0 or not self._reserve(seq, n):
                continue
            st.add(self._chunk(seq, n))

    def _admit(self, st: _Planning) -> None:
        if st.preempted:
            return  # blocks are short this step: admitting would only thrash
        while self.waiting and st.budget > 0 and len(self.running) < self.cfg.max_running:
            seq = self.waiting[0]
            hits = self.prefix.match(seq)
            if hits is None or not self._fits(seq, hits, st):
                return
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            self.allocator.retain(hits)
            self.prefix.admitted(seq, hits)
            n = self._chunk_len(seq.num_pending, st.budget, st)
            if not self._reserve(seq, n):  # cannot happen: _fits checked it
                raise AssertionError("allocator refused blocks it reported available")
            st.add(self._chunk(seq, n))

    def _fits(self, seq: Sequence, hits: list[int], st: _Planning) -> bool:
        """Whether ``seq``'s first chunk after its cached prefix ``hits`` fits now: a
        chunk at all, and its new blocks plus the cached ones that leave the evictable
        pool, plus ``watermark_blocks`` when others run."""
        start = len(hits) * self.block_size
        n = self._chunk_len(seq.num_tokens - start, st.budget, st)
        if n <= 0:
            return False
        reclaimed = sum(1 for b in hits if self.allocator.refcount(b) == 0)
        need = blocks_needed(start + n, self.block_size) - len(hits) + reclaimed
        reserve = self.cfg.watermark_blocks if self.running else 0
        return need + reserve <= self.allocator.num_available

    def _chunk_len(self, pending: int, room: int, st: _Planning) -> int:
        """Tokens of a sequence's next prefill chunk, ``pending`` tokens before it, within
        ``room``: at most ``prefill_chunk``;
        a chunk that is not the prompt's last is cut to a multiple of ``prefill_align``.
        Shorter than that it is 0 (the prompt waits a step) when another prompt already
        prefills in this step: a sliver of left-over budget would shift every later chunk
        start of the prompt off the alignment (on a GPU, each new prefill shape costs a
        cuDNN graph build: docs/adr/0006).  With no other prefill it runs, so some prompt
        always progresses."""
        n = min(pending, room, self.cfg.prefill_chunk)
        if n < pending and n >= self.cfg.prefill_align:
            n -= n % self.cfg.prefill_align
        elif n < pending and st.prefills:
            return 0
        return n

    def _reserve(self, seq: Sequence, n: int) -> bool:
        extra = blocks_needed(seq.num_computed + n, self.block_size) - len(seq.blocks)
        if extra <= 0:
            return True
        got = self.allocator.allocate(extra)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed
        self.prefix.planned(seq, start, n)
        sample = start + n == seq.num_tokens
        p = seq.params
        replay = sample and seq.replay and p.constraint is not None
        history = replay or sample and (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                                        or p.frequency_penalty != 0.0)
        if sample:
            seq.replay = False
        return ScheduledChunk(
            seq.request_id, seq.token_slice(start, start + n), start, tuple(seq.blocks),
            sample, p, seq.prompt if history else (), tuple(seq.output) if history else (),
            seq.seed, len(seq.output))

    def _preempt(self, seq: Sequence) -> str:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.replay = True
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        return seq.request_id

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:  # tail first: a cached prompt's tail is evicted before its head
            self.allocator.free(reversed(seq.blocks))
        self.prefix.released(seq)
        seq.blocks = []
        seq.num_computed = 0

    # ---- results ------------------------------------------------------------------
    def update(self, plan: StepPlan, out: StepOutput) -> list[SeqUpdate]:
        """Record a step's results: advance computed counts, append sampled tokens, and
        finish sequences on eos / stop token / a completed constraint (``final``) /
        max_tokens / context limit."""
        updates: list[SeqUpdate] = []
        for chunk in plan.chunks():
            seq = self._seqs.get(chunk.request_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # finished or aborted after planning
            seq.num_computed = chunk.start + len(chunk.tokens)
            self.prefix.computed(seq)
            if not chunk.sample:
                continue
            tok = out.sampled[chunk.request_id]
            seq.output.append(tok.token_id)
            self.generated_tokens += 1
            reason = "stop" if tok.final else self._finish_reason(seq, tok.token_id)
            if reason is not None:
                self.finish(seq.request_id, reason)
            updates.append(SeqUpdate(seq.request_id, tok, reason, None,
                                     seq.cached_tokens or 0))
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_context:
            return "length"
        return None

    # ---- checks -------------------------------------------------------------------
    def check_integrity(self) -> bool:
        """Raise AssertionError on any broken invariant (module docstring); True otherwise."""
        self.allocator.check_integrity()
        held: dict[int, int] = {}
        for seq in self.running:
            assert seq.status is SeqStatus.RUNNING, f"{seq.request_id}: not running"
            assert len(seq.blocks) >= blocks_needed(seq.num_computed, self.block_size)
            assert 0 <= seq.num_computed < seq.num_tokens or not seq.output
            assert len(set(seq.blocks)) == len(seq.blocks), f"{seq.request_id}: repeats"
            assert seq.registered * self.block_size <= seq.num_computed
            for b in seq.blocks:
                held[b] = held.get(b, 0) + 1
        for b, n in held.items():
            assert self.allocator.refcount(b) == n, f"block {b}: refcount != {n} holders"
        assert len(held) == self.allocator.num_used, "allocator used != blocks held"
        assert len(self.running) <= self.cfg.max_running, "too many running"
        arrivals = [s.arrival for s in self.running]
        assert arrivals == sorted(arrivals), "running not in arrival order"
        for seq in self.waiting:
            assert seq.status is SeqStatus.WAITING and not seq.blocks and seq.num_computed == 0
        live = {s.request_id for s in self.running} | {s.request_id for s in self.waiting}
        assert live == set(self._seqs) and len(live) == len(self.running) + len(self.waiting)
        return True


def _history_free(p: SamplingParams) -> bool:
    """Whether a row samples without its token history (no grammar, no penalty)."""
    return p.constraint is None and p.repetition_penalty == 1.0 and (
        p.presence_penalty == 0.0 and p.frequency_penalty == 0.0)


class _Planning:
    """Scratch state of one ``schedule`` call."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.decodes: list[ScheduledChunk] = []
        self.prefills: list[ScheduledChunk] = []
        self.preempted: list[str] = []
        self.planned: set[str] = set()

    def add(self, chunk: ScheduledChunk) -> None:
        (self.decodes if len(chunk.tokens) == 1 else self.prefills).append(chunk)
        self.planned.add(chunk.request_id)
        self.budget -= len(chunk.tokens)

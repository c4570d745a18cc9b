"""Per-request grammar state for constrained sampling: llguidance matchers keyed by request
id, a token mask per constrained row per step, and finishing within ``max_tokens``.

One step, for the rows of the batch that sample a constrained request (``StepRows``):

  1. ``begin`` (engine thread, before the forward): make sure every row has a matcher
     that has consumed exactly the request's output so far (a new request starts from the
     compiled spec; after a preemption the executor dropped it, and it is rebuilt by
     replaying ``history``), then hand the mask work to a worker thread, which runs while
     the model forward runs (llguidance and ``mx.eval`` both release the GIL);
  2. ``StepMasks.allowed()``: the ``[rows, vocab]`` booleans (True = allowed) for the
     sampler, which sets the rest to -inf on those rows only;
  3. ``commit`` (engine thread, after sampling): each matcher consumes its row's token;
     ``final`` says the grammar admits nothing more (the request then stops).

Finishing in time: a random or unlucky model may never close a JSON object by itself.
Each row keeps a *closing path* (``engine.grammar.closing_path``: the tokens that take its
matcher to an accepting state, found greedily) and its cost (path length, plus one token
for EOS unless the grammar stops by itself).  Invariant near the end (``cost + slack >=
remaining``): a row's cost never exceeds its remaining budget.  There a freely sampled
token is checked after sampling, and replaced by the path's first token when the rest
could not finish within ``remaining - 1``; when ``cost == remaining`` the mask is that one
token.  A row's slack is at least the cost of its whole grammar from the start (one token
may open about that much: a new call, a new item).  Farther out the cost is re-estimated
every ``refresh`` tokens only, so a single token that opens more than the slack of
required structure far from the end can still run out of budget: that output says
``length``.  A grammar whose greedy way out loops
(a pattern it keeps extending) has no path and is never forced.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from llguidance import LLExecutor, LLMatcher
from llguidance.numpy import fill_next_token_bitmask_par

from slabserve.engine.grammar import GrammarCompiler, closing_path
from slabserve.engine.step import GrammarSpec

log = logging.getLogger("slabserve.engine")
MAX_PATH = 512  # longest closing path searched (a longer way out is never forced)


@dataclass(frozen=True)
class StepRow:
    """One constrained row of a step: ``index`` tokens generated so far, ``remaining`` it
    may still generate (this one included), ``history`` its output tokens when the
    scheduler sent them (after a preemption: the executor may have to replay them)."""

    request_id: str
    spec: GrammarSpec
    index: int
    remaining: int
    history: tuple[int, ...] = ()


class _Seq:
    """A request's matcher and its closing path (valid while ``path_at == consumed``)."""

    __slots__ = ("matcher", "consumed", "path", "path_at", "cost", "slack")

    def __init__(self, matcher: LLMatcher, slack: int) -> None:
        self.matcher = matcher
        self.consumed = 0
        self.path: list[int] | None = None
        self.path_at = -1
        self.cost = 0
        self.slack = slack  # raised to the cost from the start state at the first refresh


@dataclass
class Committed:
    """What ``commit`` did with a row's sampled token: ``token`` (the sampled one, or the
    closing path's when it had to be replaced: ``replaced``), and ``final``."""

    token: int
    final: bool
    replaced: bool = False


class StepMasks:
    """The masks of one step, computed on the worker thread (``allowed`` waits for them)."""

    def __init__(self, future: Future | None, verify: list[bool]) -> None:
        self._future = future
        self.verify = verify
        self.compute_s = 0.0  # the worker's time on these masks (set before they are ready)

    def allowed(self) -> np.ndarray:
        """``[rows, vocab]`` bool: True where the row's grammar allows the token."""
        return self._future.result()


class ConstraintEngine:
    """Matchers of the constrained requests in flight (see the module docstring).

    Thread use: ``check`` from any thread; ``begin``/``commit``/``drop`` on the engine
    thread; the mask work of a step on this engine's one worker thread, which touches only
    the matchers of that step while the engine thread waits for it before ``commit``."""

    def __init__(self, compiler: GrammarCompiler, slack: int = 16, refresh: int = 8) -> None:
        self.compiler = compiler
        self.slack = slack
        self.refresh = refresh
        self._seqs: dict[str, _Seq] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="slabserve-mask")
        self._llexec: LLExecutor | None = None
        self.replaced_tokens = 0  # tokens replaced to finish within max_tokens

    @property
    def eos(self) -> frozenset[int]:
        return frozenset(self.compiler.eos_ids)

    @property
    def _eos0(self) -> int:
        return self.compiler.eos_ids[0]

    def check(self, spec: GrammarSpec) -> None:
        """``ValueError`` with the reason when ``spec`` does not compile."""
        self.compiler.matcher(spec)

    def drop(self, request_id: str) -> None:
        """Forget a request's matcher (finished, aborted or preempted)."""
        self._seqs.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._seqs)

    # ---- one step ------------------------------------------------------------------
    def begin(self, rows: list[StepRow], vocab: int) -> StepMasks:
        """Bring every row's matcher up to date, then start computing the masks."""
        seqs = [self._seq(r) for r in rows]
        verify = [False] * len(rows)
        if self._llexec is None:
            self._llexec = LLExecutor()
        step = StepMasks(None, verify)

        def work() -> np.ndarray:
            t0 = time.perf_counter()
            try:
                return self._masks(rows, seqs, verify, vocab)
            finally:
                step.compute_s = time.perf_counter() - t0

        step._future = self._worker.submit(work)
        return step

    def _seq(self, row: StepRow) -> _Seq:
        seq = self._seqs.get(row.request_id)
        if seq is not None and seq.consumed == row.index:
            return seq
        if row.index and len(row.history) != row.index:
            raise RuntimeError(f"{row.request_id}: grammar state lost and no history to "
                               f"replay ({len(row.history)} of {row.index} tokens)")
        seq = _Seq(self.compiler.matcher(row.spec), self.slack)
        if row.index:
            if not seq.matcher.consume_tokens(list(row.history)):
                log.error("%s: replaying its output broke its grammar: %s", row.request_id,
                          seq.matcher.get_error())
            seq.consumed = row.index
        self._seqs[row.request_id] = seq
        return seq

    def _masks(self, rows: list[StepRow], seqs: list[_Seq], verify: list[bool],
               vocab: int) -> np.ndarray:
        words = (vocab + 31) // 32
        bits = np.zeros((len(rows), words), dtype=np.int32)
        free: list[tuple[LLMatcher, int]] = []
        for i, (row, seq) in enumerate(zip(rows, seqs, strict=True)):
            forced = self._plan(seq, row.remaining)
            if forced is None:
                free.append((seq.matcher, i))
                verify[i] = seq.path is not None and seq.cost + seq.slack >= row.remaining
            else:
                bits[i, forced // 32] = np.int32(np.uint32(1 << (forced % 32)).view(np.int32))
        if free:
            fill_next_token_bitmask_par(self._llexec, free, bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        allowed = allowed.astype(bool)
        for i in np.flatnonzero(~allowed.any(axis=1)).tolist():
            allowed[i, list(self.compiler.eos_ids)] = True  # a broken grammar: end it
        return allowed

    def _plan(self, seq: _Seq, remaining: int) -> int | None:
        """The one token to force (the closing path's next, when the budget is tight), or
        None to sample freely under the grammar's mask.  Refreshes the path when stale
        and near the end, or every ``refresh`` tokens."""
        stale = seq.path_at != seq.consumed
        if seq.path_at < 0:
            self._refresh(seq, remaining)
            if seq.path is not None:  # one token may open about this much structure
                seq.slack = max(seq.slack, seq.cost)
            stale = False
        elif stale and (seq.consumed - seq.path_at >= self.refresh
                        or seq.cost + seq.slack >= remaining):
            self._refresh(seq, remaining)
            stale = False
        if not stale and seq.path is not None and seq.cost >= remaining:
            return seq.path[0] if seq.path else self._eos0
        return None

    def _refresh(self, seq: _Seq, limit: int) -> None:
        probe = seq.matcher.deep_copy()
        seq.path = closing_path(probe, min(limit, MAX_PATH), self.compiler.closers, self.eos)
        seq.path_at = seq.consumed
        seq.cost = 1 << 30 if seq.path is None else len(seq.path) + (
            0 if probe.is_stopped() else 1)

    def commit(self, rows: list[StepRow], masks: StepMasks,
               tokens: list[int]) -> list[Committed]:
        """Consume each row's sampled token (replaced by the closing path's first token
        when it would leave too little budget to finish)."""
        out = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            seq = self._seqs[row.request_id]
            replaced = False
            if masks.verify[i] and tok not in self.eos:
                tok, replaced = self._verified(seq, tok, row.remaining - 1)
            elif seq.path and seq.path_at == seq.consumed and tok == seq.path[0]:
                self._advance_path(seq)
            ok = seq.matcher.consume_token(tok)
            seq.consumed += 1
            if not ok:
                log.error("%s: token %d broke its grammar: %s", row.request_id, tok,
                          seq.matcher.get_error())
            out.append(Committed(tok, not ok or seq.matcher.is_stopped(), replaced))
        self.replaced_tokens += sum(c.replaced for c in out)
        return out

    def _advance_path(self, seq: _Seq) -> None:
        """The token taken is the path's first: the rest is the path from the next state."""
        seq.path = seq.path[1:]
        seq.path_at = seq.consumed + 1
        seq.cost -= 1

    def _verified(self, seq: _Seq, tok: int, budget: int) -> tuple[int, bool]:
        if seq.path and tok == seq.path[0]:
            self._advance_path(seq)
            return tok, False
        probe = seq.matcher.deep_copy()
        if probe.consume_token(tok):
            path = closing_path(probe, min(budget, MAX_PATH), self.compiler.closers,
                                self.eos)
            if path is not None:
                cost = len(path) + (0 if probe.is_stopped() else 1)
                if cost <= budget:
                    seq.path, seq.path_at, seq.cost = path, seq.consumed + 1, cost
                    return tok, False
        if not seq.path:  # accepting already: only EOS finishes in time
            seq.path_at = -1
            return self._eos0, True
        forced = seq.path[0]
        self._advance_path(seq)
        return forced, True

    def close(self) -> None:
        self._worker.shutdown(wait=False)

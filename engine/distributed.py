"""Tensor-parallel serving over MLX distributed: rank 0 plans every step, every rank runs it.

One logical server spans the ranks of an ``mlx.launch`` group.  Each rank loads the model
sharded by mlx-lm (``engine.loader.load_sharded``: attention heads, KV heads and MLP columns
split N ways; the sharded layers all-sum their outputs, so every rank ends a forward with the
complete hidden state and logits).  Rank 0 runs the HTTP server, the scheduler and the
``ModelExecutor`` on a ``ShardedRunner`` with a ``Leader``; every other rank runs a
``Follower`` over its own ``ShardedRunner``.

One step, as messages (all through ``mx.distributed.all_sum``: rank 0 contributes the
message, the others zeros, so every backend that sums int32 carries it; no side channel)::

    rank 0 (engine thread)                       rank r > 0 (main thread)
    scheduler.schedule() -> plan
    ModelExecutor.execute(plan)
      ShardedRunner.forward(prefills, decodes)
        header [op, seq, #pre, #dec, slabs, path, len] ---> Follower.run: recv header
        payload  (tokens, positions, block tables)  ---> recv payload, grow pool to ``slabs``
        ModelRunner.forward  <---- all-sums inside ---->   ModelRunner.forward (same inputs)
      sample on rank 0 (only it has the grammars,
      penalties and seeds); the tokens reach the
      others as the next step's decode inputs
    scheduler.update(plan, output)

Invariants:
  * every rank evaluates the same collectives in the same order: followers run
    ``ModelRunner.forward`` on exactly the inputs rank 0 ran (``want_logits`` included), and
    ``eval_each_forward`` evaluates each forward of a step before building the next, so two
    independent forwards never interleave their all-sums differently on two ranks (the
    attention path chosen per rank may differ; it holds no collective);
  * block decisions are rank 0's alone (allocation, prefix caching, preemption, aborts);
    the other ranks' pools are plain storage indexed by the same block ids, grown to rank
    0's slab count before each step, so they hold the same blocks for their own KV heads.
    Followers keep no per-request state: ``release`` and aborts need no message;
  * messages carry a sequence number; a follower that sees another one fails;
  * a wait on the other ranks (a step, a message, a heartbeat) that outlasts
    ``DistConfig.timeout_s`` calls ``on_fault`` from a watchdog thread (the waiting thread is
    blocked inside MLX and cannot be interrupted); a collective that raises (a peer's
    socket closed) does the same on rank 0 and ends ``Follower.run`` elsewhere.  The
    composition root decides what a fault does (it ends the process, non-zero);
  * rank 0 sends a heartbeat whenever it has sent nothing for ``heartbeat_s`` (an idle
    server), so a follower's wait for rank 0 is bounded even when no request arrives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from slabserve.engine.runner import ModelRunner, SeqInput

log = logging.getLogger("slabserve.distributed")

OP_STEP, OP_HEARTBEAT, OP_STOP = 1, 2, 3
HEADER_WORDS = 7  # op, seq, prefills, decodes, pool slabs, attention override, payload words
EXIT_GROUP_LOST = 3  # a rank's exit status when the group failed under it
# the selector's override as one int32 word: auto, force native, force gather
_OVERRIDE_CODES: dict[bool | None, int] = {None: 0, True: 1, False: 2}
_OVERRIDES = {v: k for k, v in _OVERRIDE_CODES.items()}
Fault = Callable[[str], None]


@dataclass(frozen=True)
class DistConfig:
    """``timeout_s``: the longest any rank waits on the others (one step, or rank 0's next
    message) before the group counts as failed; it must exceed the slowest step.
    ``heartbeat_s``: an idle rank 0 sends a heartbeat this often (None: a quarter of the
    timeout, at most 2 s)."""

    timeout_s: float = 120.0
    heartbeat_s: float | None = None

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("the distributed timeout must be positive")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError("heartbeat_s must be positive and below timeout_s")

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_s or min(2.0, self.timeout_s / 4)


# ---- the step message ----------------------------------------------------------------
def encode_inputs(prefills: Sequence[SeqInput], decodes: Sequence[SeqInput]) -> np.ndarray:
    """One step's forward inputs as int32 words: per sequence (prefills, then decodes)
    ``[len(tokens), start, len(blocks), want_logits, *tokens, *blocks]``."""
    words: list[int] = []
    for s in (*prefills, *decodes):
        words += (len(s.tokens), s.start, len(s.blocks), int(s.want_logits))
        words += s.tokens
        words += s.blocks
    return np.asarray(words, dtype=np.int32)


def decode_inputs(words: np.ndarray, prefills: int, decodes: int
                  ) -> tuple[list[SeqInput], list[SeqInput]]:
    """Inverse of ``encode_inputs``; ValueError when the words do not parse exactly."""
    w, i, seqs = words.tolist(), 0, []
    for _ in range(prefills + decodes):
        if i + 4 > len(w):
            raise ValueError("step message ends inside a sequence header")
        n, start, nb, want = w[i : i + 4]
        i += 4
        seqs.append(SeqInput(w[i : i + n], start, w[i + n : i + n + nb], bool(want)))
        i += n + nb
    if i != len(w):
        raise ValueError(f"step message has {len(w)} words, its sequences {i}")
    return seqs[:prefills], seqs[prefills:]


class _Channel:
    """Rank 0 -> every rank, through ``all_sum`` (the others add zeros): a fixed header,
    then a payload of ``header[-1]`` words when that is not zero."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group

    def _sum(self, words: np.ndarray) -> np.ndarray:
        return np.array(mx.distributed.all_sum(mx.array(words), group=self.group))

    def send(self, header: Sequence[int], payload: np.ndarray | None = None) -> None:
        self._sum(np.asarray(header, dtype=np.int32))
        if header[-1]:
            self._sum(payload)

    def recv(self) -> tuple[list[int], np.ndarray]:
        header = self._sum(np.zeros(HEADER_WORDS, dtype=np.int32)).tolist()
        n = header[-1]
        payload = self._sum(np.zeros(n, dtype=np.int32)) if n else np.zeros(0, np.int32)
        return header, payload


class Watchdog:
    """Bounds every wait on the other ranks: ``with dog.waiting("step 7"):`` marks one;
    one that lasts past ``timeout_s`` calls ``on_fault(reason)`` once, from the watchdog's
    daemon thread."""

    def __init__(self, timeout_s: float, on_fault: Fault, who: str) -> None:
        self.timeout_s = timeout_s
        self.on_fault = on_fault
        self.who = who
        self.fired = False
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="slabserve-dist-watchdog",
                                        daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(min(0.5, self.timeout_s / 10)):
            with self._lock:
                what, waited = self._what, time.monotonic() - self._since
            if what is not None and waited > self.timeout_s:
                self.fired = True
                self.on_fault(f"{self.who}: {what} waited {waited:.0f}s on the other ranks "
                              f"(timeout {self.timeout_s:g}s): a rank died or hangs")
                return


def _header(op: int, seq: int, prefills: int = 0, decodes: int = 0, slabs: int = 0,
            override: int = 0, words: int = 0) -> list[int]:
    return [op, seq, prefills, decodes, slabs, override, words]

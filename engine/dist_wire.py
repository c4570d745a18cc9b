"""The wire of tensor-parallel serving (engine/distributed.py): a step's forward inputs as
int32 words, the channel that carries them from rank 0 to every rank through
``mx.distributed.all_sum``, and the watchdog that bounds every wait on the other ranks.

Invariants: a message is the sum of rank 0's words and the other ranks' zeros, so every
backend that sums int32 carries it; each sum is checked word by word on rank 0 (``Channel``);
nothing here decides what a failure does: ``Watchdog`` reports through ``on_fault``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from slabserve.engine.runner import SeqInput

OP_STEP, OP_HEARTBEAT, OP_STOP = 1, 2, 3
HEADER_WORDS = 7  # op, seq, prefills, decodes, pool slabs, attention override, payload words
MESSAGE_WORDS = 1024  # the first sum of every message: header + the payload's start
Fault = Callable[[str], None]


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


class Channel:
    """Rank 0 -> every rank, through ``all_sum`` (the others add zeros): one sum of
    ``MESSAGE_WORDS`` (the header, then as much of the payload as fits: a decode step's
    usually all of it), a second sum for the rest of a longer payload; ``ack`` after a step.

    Every rank adds ``tag(seq, rank)`` (a hash of the message's sequence number, which
    every rank knows in advance, and the rank) to every word, and one extra word: rank 0
    checks that each word came back as its own plus every rank's tag, the others that the
    extra word did, and anything else raises ``RuntimeError``.  MLX's ring backend can end
    a sum that was in flight when a peer died without raising, part of its output correct
    (the dead rank's part was already on the wire) and part rank 0's own words alone: a
    check word at either end was seen to pass.  Words must lie in ``[0, 2**30)``."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group
        self.size = group.size()
        self.rank = group.rank()
        self._span = (1 << 30) // self.size  # words + the tags stay within int32

    def tag(self, seq: int, part: int, rank: int) -> int:
        h = hashlib.blake2b(f"{seq}:{part}:{rank}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") % self._span

    def _sum(self, words: np.ndarray, seq: int, part: int) -> np.ndarray:
        mine = np.append(np.asarray(words, dtype=np.int64), 0)
        x = (mine + self.tag(seq, part, self.rank)).astype(np.int32)
        out = np.array(mx.distributed.all_sum(mx.array(x), group=self.group))
        out = out.astype(np.int64) - sum(self.tag(seq, part, r) for r in range(self.size))
        bad = np.count_nonzero(out != mine) if self.rank == 0 else int(out[-1] != 0)
        if bad:
            raise RuntimeError(f"message {seq} did not reach every rank ({bad} of "
                               f"{out.size} words wrong)")
        return out[:-1].astype(np.int32)

    def send(self, header: Sequence[int], payload: np.ndarray) -> None:
        seq, first = header[1], np.zeros(MESSAGE_WORDS, dtype=np.int32)
        inline = min(len(payload), MESSAGE_WORDS - HEADER_WORDS)
        first[:HEADER_WORDS] = header
        first[HEADER_WORDS : HEADER_WORDS + inline] = payload[:inline]
        self._sum(first, seq, 0)
        if len(payload) > inline:
            self._sum(payload[inline:], seq, 1)

    def recv(self, seq: int) -> tuple[list[int], np.ndarray]:
        first = self._sum(np.zeros(MESSAGE_WORDS, dtype=np.int32), seq, 0)
        header = first[:HEADER_WORDS].tolist()
        n = header[-1]
        inline = min(n, MESSAGE_WORDS - HEADER_WORDS)
        payload = first[HEADER_WORDS : HEADER_WORDS + inline]
        if n > inline:
            rest = self._sum(np.zeros(n - inline, dtype=np.int32), seq, 1)
            payload = np.concatenate([payload, rest])
        return header, payload

    def ack(self, seq: int) -> None:
        """Every rank finished step ``seq`` (rank 0 samples only after this)."""
        self._sum(np.zeros(0, dtype=np.int32), seq, 2)


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


def make_header(op: int, seq: int, prefills: int = 0, decodes: int = 0, slabs: int = 0,
                override: int = 0, words: int = 0) -> list[int]:
    return [op, seq, prefills, decodes, slabs, override, words]

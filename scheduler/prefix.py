"""The scheduler's side of automatic prefix caching.

The allocator (kvcache/allocator.py, kvcache/prefix.py) keeps full blocks cached under a
hash chain of their tokens (and the request's ``cache_salt``) after their sequences end,
evicting the least recently used when it needs room.  Here, per sequence:

  * at admission, ``match`` finds the longest cached prefix of ``tokens[:-1]`` (the last
    token is always computed, so its logits exist) and the sequence starts with those
    blocks (refcount + 1) and ``num_computed`` past them;
  * ``planned`` marks the keys of the full blocks a planned chunk will fill as in flight,
    and ``match`` answers None (wait) for a sequence whose next block is in flight in
    another sequence: equal prompts (n > 1, a burst of one system prompt) are prefilled
    once, the later ones admitted onto the cached blocks;
  * ``computed`` registers the full blocks a step computed (prompt and output alike);
  * ``released`` forgets what a finished or preempted sequence had in flight.

Invariant: a block is registered only after the step that wrote its K/V, and a shared
block is never written (writes start at ``num_computed``, past every matched block).
"""

from __future__ import annotations

from slabserve.kvcache import BlockAllocator, BlockKey, block_keys, block_tokens
from slabserve.scheduler.sequence import Sequence


class PrefixCaching:
    """Owned by the ``Scheduler``; a no-op when the allocator's caching is off.

    ``queries`` / ``hits``: prompt tokens looked up at first admission / found cached
    (vLLM's prefix-cache queries and hits, in tokens)."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.enabled = allocator.caching
        self.queries = 0
        self.hits = 0
        self._in_flight: dict[BlockKey, str] = {}  # key -> request computing it

    def _keys(self, seq: Sequence, blocks: int) -> list[BlockKey]:
        """``seq.keys``, extended lazily to cover at least its first ``blocks`` full
        blocks (the list itself, not a copy: a decode step must not cost O(context))."""
        have = len(seq.keys)
        if have < blocks:
            bs = self.block_size
            parent = seq.keys[-1] if have else None
            tokens = seq.token_slice(have * bs, blocks * bs)
            seq.keys.extend(block_keys(tokens, bs, seq.cache_salt, parent))
        return seq.keys

    def _tokens(self, seq: Sequence, first: int, end: int) -> list[tuple[int, ...]]:
        bs = self.block_size
        return block_tokens(seq.token_slice(first * bs, end * bs), bs)

    def match(self, seq: Sequence) -> list[int] | None:
        """Block ids of the longest cached prefix of ``seq``'s tokens but the last; None
        when the block after it is being computed by another sequence (admit later)."""
        if not self.enabled:
            return []
        full = (seq.num_tokens - 1) // self.block_size
        keys = self._keys(seq, full)[:full]
        hits = self.allocator.lookup(keys, self._tokens(seq, 0, full))
        if len(hits) < full:
            owner = self._in_flight.get(keys[len(hits)])
            if owner is not None and owner != seq.request_id:
                return None
        return hits

    def admitted(self, seq: Sequence, hits: list[int]) -> None:
        """``seq`` holds ``hits`` (already retained): it starts past them."""
        seq.blocks = list(hits)
        seq.registered = len(hits)
        seq.num_computed = len(hits) * self.block_size
        if seq.cached_tokens is None:  # the first admission counts; a resume does not
            seq.cached_tokens = seq.num_computed
            self.queries += len(seq.prompt)
            self.hits += seq.num_computed

    def planned(self, seq: Sequence, start: int, n: int) -> None:
        if not self.enabled:
            return
        end = (start + n) // self.block_size
        if end <= seq.registered:  # a decode step inside a block: nothing new in flight
            return
        keys = self._keys(seq, end)
        for i in range(seq.registered, end):
            self._in_flight.setdefault(keys[i], seq.request_id)

    def computed(self, seq: Sequence) -> None:
        """Register the full blocks ``seq`` has K/V for now."""
        full = seq.num_computed // self.block_size
        if not self.enabled or full <= seq.registered:
            return
        keys = self._keys(seq, full)
        self.allocator.register_chain(seq.blocks, keys, self._tokens(seq, seq.registered, full),
                                      start=seq.registered)
        for key in keys[seq.registered : full]:
            if self._in_flight.get(key) == seq.request_id:
                del self._in_flight[key]
        seq.registered = full

    def released(self, seq: Sequence) -> None:
        """``seq`` gave its blocks back (finished, aborted or preempted)."""
        if self._in_flight:
            for key in seq.keys[seq.registered:]:
                if self._in_flight.get(key) == seq.request_id:
                    del self._in_flight[key]
        seq.registered = 0

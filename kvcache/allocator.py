"""Block allocator: free list, refcounts, growth in whole slabs, automatic prefix caching.

Pure Python, no MLX: the scheduler owns one and tests drive it without a model.

Every block id in ``[0, capacity)`` is in exactly one state:
  * free:      refcount 0, not cached, on the free list (a min-heap);
  * evictable: refcount 0, cached (its K/V still valid and findable by ``lookup``), in
    the least-recently-used order of the prefix index; only with ``enable_caching``;
  * used:      refcount >= 1 (cached or not).

Invariants (checked by ``check_integrity``):
  * the three states above partition the blocks: ``num_free_uncached + num_evictable +
    num_used == capacity``; ``num_free`` counts free and evictable blocks (both can be
    allocated);
  * cached keys and cached blocks are in bijection (one block per key, one key per
    block); a cached block's contents never change while it is cached;
  * ``capacity == num_slabs * slab_blocks <= max_blocks``; capacity only grows (slabs
    are never copied or dropped); without ``enable_caching`` no block is ever cached.

Prefix caching (``enable_caching=True``; keys from ``slabserve.kvcache.prefix``):
  * ``lookup(keys, tokens_per_block)`` -> the cached blocks of the longest verified
    prefix (pure query); ``retain(those)`` takes references (an evictable block becomes
    used, so ``num_available`` drops by the evictable hits: ``refcount(b) == 0`` before
    the retain).  Retain before the next ``allocate``, which may evict them.
  * ``register(block, key, tokens, parent)`` once a FULL block's K/V is computed (from
    then on nobody writes to it); a key cached already with another block keeps that
    block and the new one stays private (free list when freed).
  * ``free`` a sequence's blocks tail first (``free(reversed(blocks))``): blocks become
    evictable in the order freed and are evicted oldest first, so a prompt's tail goes
    before its head (a tail block is useless without its head: lookups walk from block
    0, and a head block serves every prompt that starts with it).
  * ``allocate`` uses the free list, then evicts (LRU) onto it, then grows by slabs: the
    cache holds only blocks of slabs that live sequences needed.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from slabserve.kvcache.prefix import BlockKey, PrefixIndex


class BlockAllocator:
    """Hands out global block ids in ``[0, capacity)``, lowest free ids first, so live
    blocks stay packed in the fewest slabs (each slab a step writes to costs one scatter
    per layer and side: docs/benchmarks/kv-write.md).

    ``allocate(n)`` returns ``n`` ids or ``None`` when they cannot be had even after
    growing and evicting; it never hands out part of a request.  When the free list is
    short, it grows by whole slabs (calling ``on_grow(new_slab_count)`` so the owner of
    the memory can append slabs) up to ``max_blocks``, then evicts cached blocks.
    """

    def __init__(
        self,
        slab_blocks: int,
        max_blocks: int,
        initial_slabs: int = 1,
        on_grow: Callable[[int], None] | None = None,
        enable_caching: bool = False,
    ) -> None:
        if slab_blocks <= 0:
            raise ValueError("slab_blocks must be positive")
        if max_blocks < slab_blocks:
            raise ValueError("max_blocks must hold at least one slab")
        self.slab_blocks = slab_blocks
        self.max_slabs = max_blocks // slab_blocks
        self.caching = enable_caching
        self._on_grow = on_grow
        self._refcount: list[int] = []
        self._free: list[int] = []  # a min-heap: lowest ids first; never cached blocks
        # stays empty without enable_caching; evicts a slab at a time (PrefixIndex)
        self._cache = PrefixIndex(group_blocks=slab_blocks)
        self.num_slabs = 0
        self._grow_to(max(1, min(initial_slabs, self.max_slabs)))

    # ---- accounting -------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks that exist now (allocated slabs x slab_blocks)."""
        return self.num_slabs * self.slab_blocks

    @property
    def max_blocks(self) -> int:
        """Blocks that may ever exist (the byte budget, in whole slabs)."""
        return self.max_slabs * self.slab_blocks

    @property
    def num_free(self) -> int:
        """Blocks allocatable now without growing: free plus evictable."""
        return len(self._free) + self._cache.num_evictable

    @property
    def num_free_uncached(self) -> int:
        """Blocks on the free list (allocatable without evicting anything)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with refcount >= 1."""
        return self.capacity - self.num_free

    @property
    def num_available(self) -> int:
        """Blocks an ``allocate`` could still return, growth and eviction included."""
        return self.num_free + self.max_blocks - self.capacity

    @property
    def num_cached(self) -> int:
        """Cached blocks, in use or evictable."""
        return self._cache.num_cached

    @property
    def num_evictable(self) -> int:
        """Cached blocks with refcount 0 (counted in ``num_free`` / ``num_available``)."""
        return self._cache.num_evictable

    @property
    def evictions(self) -> int:
        """Cached blocks evicted by ``allocate`` so far (``reset_cache`` not counted)."""
        return self._cache.evictions

    def usage(self) -> float:
        """Fraction of the budget (max_blocks) in use (evictable blocks not counted)."""
        return self.num_used / self.max_blocks

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def is_cached(self, block: int) -> bool:
        return self._cache.is_cached(block)

    # ---- operations -------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    def allocate(self, n: int) -> list[int] | None:
        """Return ``n`` fresh, uncached block ids (refcount 1 each), or ``None`` if
        impossible.  Order of supply: the free list; when it is short, the least recently
        freed cached blocks are evicted onto it; only then does the pool grow by whole
        slabs.  The handout is lowest ids first either way, so live blocks stay packed in
        the fewest slabs, and the cache never makes the pool grow: with nothing shared,
        the pool grows exactly as it would without caching."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > self.num_available:
            return None
        evict = min(n - len(self._free), self._cache.num_evictable)
        if evict > 0:
            for b in self._cache.evict(evict):
                heapq.heappush(self._free, b)
        if n > len(self._free):
            short = n - len(self._free)
            self._grow_to(self.num_slabs + -(-short // self.slab_blocks))
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self._refcount[b] = 1
        return out

    def retain(self, blocks: Iterable[int]) -> None:
        """Add a reference to each block: used blocks (sharing) or evictable ones (a
        ``lookup`` hit, which stops being evictable).  A free, uncached block raises
        ValueError and nothing changes."""
        blocks = list(blocks)
        for b in blocks:
            if self._refcount[b] <= 0 and not self._cache.is_evictable(b):
                raise ValueError(f"retain of free block {b}")
        for b in blocks:
            if self._refcount[b] == 0:
                self._cache.unpark(b)
            self._refcount[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block, in order.  A block reaching zero becomes
        evictable (the most recent) if cached, else goes back to the free list.  A
        reference not held raises ValueError and nothing changes.  Free a sequence's
        blocks as ``reversed(blocks)`` (module docstring)."""
        blocks = list(blocks)
        refcount = self._refcount
        for b, k in Counter(blocks).items():
            if refcount[b] < k:
                raise ValueError(f"double free of block {b}")
        cached, park, free = self._cache.is_cached, self._cache.park, self._free
        for b in blocks:
            rc = refcount[b] - 1
            refcount[b] = rc
            if rc == 0:
                if cached(b):
                    park(b)
                else:
                    heapq.heappush(free, b)

    # ---- prefix caching -----------------------------------------------------------
    def lookup(
        self, keys: Sequence[BlockKey], tokens_per_block: Sequence[Sequence[int]]
    ) -> list[int]:
        """Block ids of the longest prefix of ``keys`` that is cached, each hit verified
        by its token ids and parent key (``slabserve.kvcache.prefix``).  A pure query:
        no refcount or LRU change.  ``[]`` without caching."""
        return self._cache.match(keys, tokens_per_block)

    def register(
        self, block: int, key: BlockKey, tokens: Sequence[int], parent: BlockKey | None
    ) -> bool:
        """Cache ``block`` (refcount >= 1, FULL, K/V computed) under ``key``; ``tokens``
        are its token ids, ``parent`` the previous block's key (None for block 0).
        Returns whether ``block`` is now cached: False when ``key`` is already cached
        with another block (that one is kept; ``block`` stays private) or without
        caching.  Registering a block again with the same entry is a no-op."""
        if self._refcount[block] <= 0:
            raise ValueError(f"register of free block {block}")
        if not self.caching:
            return False
        return self._cache.add(block, key, tokens, parent)

    def register_chain(
        self,
        blocks: Sequence[int],
        keys: Sequence[BlockKey],
        tokens_per_block: Sequence[Sequence[int]],
        start: int = 0,
    ) -> int:
        """``register`` full blocks ``start .. start + len(tokens_per_block) - 1`` of one
        sequence, chaining the parents: ``blocks`` and ``keys`` are its block table and
        keys from block 0 (at least that long), ``tokens_per_block`` the token ids of the
        blocks registered, from ``start`` on.  Returns how many of them are now cached."""
        end = start + len(tokens_per_block)
        for b in blocks[start:end]:
            if self._refcount[b] <= 0:
                raise ValueError(f"register of free block {b}")
        if not self.caching:
            return 0
        return self._cache.add_chain(blocks, keys, tokens_per_block, start)

    def reset_cache(self) -> int:
        """Uncache every evictable block (they become free); blocks in use stay cached.
        Returns how many were dropped.  For benchmarks and tests."""
        dropped = self._cache.drop_evictable()
        for b in dropped:
            heapq.heappush(self._free, b)
        return len(dropped)

    # ---- checks -----------------------------------------------------------------
    def check_integrity(self) -> bool:
        """Raise AssertionError on any broken invariant; return True otherwise."""
        cap = self.capacity
        assert len(self._refcount) == cap, "refcount table size != capacity"
        assert self.num_slabs <= self.max_slabs, "grew past the budget"
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate ids on the free list"
        assert all(self._free[(i - 1) // 2] <= self._free[i] for i in range(1, len(free)))
        self._cache.check()
        assert self.caching or self._cache.num_cached == 0, "cached block without caching"
        used = cached_count = 0
        for b in range(cap):
            rc, cached = self._refcount[b], self._cache.is_cached(b)
            evictable = self._cache.is_evictable(b)
            assert rc >= 0, f"negative refcount on block {b}"
            assert (b in free) == (rc == 0 and not cached), f"block {b}: rc {rc}, free list"
            assert evictable == (rc == 0 and cached), f"block {b}: rc {rc}, evictable"
            used += rc > 0
            cached_count += cached
        assert len(free) + self._cache.num_evictable + used == cap, "states do not add up"
        assert cached_count == self._cache.num_cached, "cached ids beyond capacity"
        return True

    # ---- growth -----------------------------------------------------------------
    def _grow_to(self, slabs: int) -> None:
        slabs = min(slabs, self.max_slabs)
        if slabs <= self.num_slabs:
            return
        if self._on_grow is not None:
            self._on_grow(slabs)
        first = self.capacity
        self.num_slabs = slabs
        self._refcount.extend([0] * (self.capacity - first))
        self._free.extend(range(first, self.capacity))  # larger than every id in the heap

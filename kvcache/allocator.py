"""Block allocator: free list, refcounts, growth in whole slabs, exact accounting.

Pure Python, no MLX: the scheduler owns one and tests drive it without a model.

Invariants (checked by ``check_integrity``):
  * every block id in ``[0, capacity)`` is either on the free list (refcount 0) or
    referenced (refcount >= 1), never both, never neither;
  * ``num_free + num_used == capacity`` and ``capacity == num_slabs * slab_blocks``;
  * ``capacity <= max_blocks``; capacity only grows (slabs are never copied or dropped).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable


class BlockAllocator:
    """Hands out global block ids in ``[0, capacity)``, lowest free ids first, so live
    blocks stay packed in the fewest slabs (each slab a step writes to costs one scatter
    per layer and side: docs/benchmarks/kv-write.md).

    ``allocate(n)`` returns ``n`` ids or ``None`` when they cannot be had even after
    growing; it never hands out part of a request.  When the free list is short, it
    grows by whole slabs (calling ``on_grow(new_slab_count)`` so the owner of the
    memory can append slabs) up to ``max_blocks``.
    """

    def __init__(
        self,
        slab_blocks: int,
        max_blocks: int,
        initial_slabs: int = 1,
        on_grow: Callable[[int], None] | None = None,
    ) -> None:
        if slab_blocks <= 0:
            raise ValueError("slab_blocks must be positive")
        if max_blocks < slab_blocks:
            raise ValueError("max_blocks must hold at least one slab")
        self.slab_blocks = slab_blocks
        self.max_slabs = max_blocks // slab_blocks
        self._on_grow = on_grow
        self._refcount: list[int] = []
        self._free: list[int] = []  # a min-heap: lowest ids first
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
        """Blocks free now, not counting slabs not yet grown."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def num_available(self) -> int:
        """Blocks an ``allocate`` could still return, growth included."""
        return len(self._free) + self.max_blocks - self.capacity

    def usage(self) -> float:
        """Fraction of the budget (max_blocks) in use."""
        return self.num_used / self.max_blocks

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    # ---- operations -------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    def allocate(self, n: int) -> list[int] | None:
        """Return ``n`` fresh block ids (refcount 1 each), or ``None`` if impossible."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > self.num_available:
            return None
        if n > len(self._free):
            short = n - len(self._free)
            self._grow_to(self.num_slabs + -(-short // self.slab_blocks))
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self._refcount[b] = 1
        return out

    def retain(self, blocks: Iterable[int]) -> None:
        """Add a reference to blocks already in use (prefix sharing)."""
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"retain of free block {b}")
            self._refcount[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero go back to the free list."""
        for b in blocks:
            rc = self._refcount[b]
            if rc <= 0:
                raise ValueError(f"double free of block {b}")
            self._refcount[b] = rc - 1
            if rc == 1:
                heapq.heappush(self._free, b)

    def check_integrity(self) -> bool:
        """Raise AssertionError on any broken invariant; return True otherwise."""
        cap = self.capacity
        assert len(self._refcount) == cap, "refcount table size != capacity"
        assert self.num_slabs <= self.max_slabs, "grew past the budget"
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate ids on the free list"
        for b in range(cap):
            rc = self._refcount[b]
            assert rc >= 0, f"negative refcount on block {b}"
            assert (rc == 0) == (b in free), f"block {b}: refcount {rc}, free={b in free}"
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

"""Automatic prefix caching: block keys (a hash chain) and the index of cached blocks.

Pure Python, no MLX.  The ``BlockAllocator`` owns one ``PrefixIndex`` (when built with
``enable_caching=True``); callers compute keys with ``block_keys`` and talk to the
allocator (``lookup`` / ``retain`` / ``register`` / ``free``), never to the index.

Keys.  Only FULL blocks are keyed.  Full block ``i`` of a sequence has the key

    key_i    = H(key_{i-1} || tokens_i)        tokens_i: its ``block_size`` token ids as
    key_{-1} = root_key(salt)                  native int64 (``array('q').tobytes()``)

with ``H`` = BLAKE2b with a 16-byte digest, so ``key_i`` digests the salt and every
token of blocks ``0..i``: two sequences share ``key_i`` iff they share the salt and the
first ``(i + 1) * block_size`` tokens (barring a 128-bit collision).  ``cache_salt``
(per request, optional) only seeds the root, so tenants with different salts never share
a key; ``None`` (no salt) and ``""`` are different salts.  Keys are process-local (native
byte order, never persisted).

Collisions.  A hit does not trust the digest alone: the index stores, per cached block,
its token ids and its parent key (the previous block's key; ``None`` for a sequence's
first block) and ``lookup`` walks the chain from block 0, accepting block ``i`` only if
its stored tokens equal the caller's ``tokens_i`` and its stored parent equals the
caller's ``key_{i-1}`` (``None`` for ``i == 0``).  So a block computed under a different
prefix is returned only if its parent key equals ours although the prefixes differ:
somewhere down the parent chain (salt included) two different inputs gave one BLAKE2b
digest, a 128-bit collision (about n^2 / 2^129 for n keys ever made).  A colliding
digest alone (``key_i`` equal, tokens or parent different) gives a miss, never a wrong
block: tests/test_prefix_cache.py forces every digest equal and checks it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple, NewType

BlockKey = NewType("BlockKey", bytes)

DIGEST_BYTES = 16
_DOMAIN = b"slabserve/prefix-cache/v1"


def _digest(data: bytes) -> bytes:
    """The chain's hash ``H`` (tests monkeypatch it to force collisions)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def root_key(salt: str | None = None) -> BlockKey:
    """``key_{-1}``: the parent of a sequence's first block, seeded by the cache salt."""
    if salt is None:
        return BlockKey(_digest(_DOMAIN))
    return BlockKey(_digest(_DOMAIN + b"\x00salt\x00" + salt.encode("utf-8")))


def block_keys(
    tokens: Sequence[int],
    block_size: int,
    salt: str | None = None,
    parent: BlockKey | None = None,
) -> list[BlockKey]:
    """Keys of the full blocks of ``tokens`` (a trailing partial block gets none).

    ``parent`` None: ``tokens`` start a sequence (block 0), chained from
    ``root_key(salt)``.  Incremental use: ``parent`` = the key of the last full block
    already keyed and ``tokens`` = the tokens after it; ``salt`` is then ignored (the
    parent already carries it).  So ``block_keys(a + b, bs, salt)`` equals
    ``ka + block_keys(b, bs, parent=ka[-1])`` with ``ka = block_keys(a, bs, salt)`` when
    ``len(a)`` is a multiple of ``bs``.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(tokens) // block_size
    if n == 0:
        return []
    data = array("q", tokens[: n * block_size]).tobytes()
    step = 8 * block_size
    key = root_key(salt) if parent is None else parent
    digest = _digest
    out: list[BlockKey] = []
    for start in range(0, n * step, step):
        key = digest(key + data[start : start + step])
        out.append(key)
    return out


def block_tokens(tokens: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The token ids of each full block of ``tokens`` (what ``lookup`` / ``register``
    compare), aligned with ``block_keys(tokens, block_size, ...)``."""
    n = len(tokens) // block_size
    return [tuple(tokens[i * block_size : (i + 1) * block_size]) for i in range(n)]


class CachedBlock(NamedTuple):
    """What the index knows of a cached block: enough to verify a hit."""

    key: BlockKey
    parent: BlockKey | None  # the previous block's key; None for a sequence's first block
    tokens: tuple[int, ...]


class PrefixIndex:
    """Cached blocks by key, and the least-recently-used order of the evictable ones.

    Owned by ``BlockAllocator``, which alone knows refcounts: it calls ``park`` when a
    cached block's refcount drops to 0 and ``unpark`` when it rises from 0.

    Eviction is LRU at the granularity of a group of ``group_blocks`` consecutive block
    ids (the allocator's slab): ``evict`` takes the least recently parked blocks of one
    group, the group of the oldest evictable block, and stays on that group while it has
    evictable blocks.  Evicted blocks are the next ones handed out, so new blocks stay
    packed in few slabs, as the free list keeps them without caching: with plain LRU they
    came from every slab, and a step's K/V writes and prefix gathers split into one
    operation per slab touched.

    Every block of a prompt passes through ``add``, ``park`` and ``evict`` once, so they
    are written as plain loops over local names (docs/adr/0011-prefix-caching.md: their
    cost per step is what caching costs where nothing is shared).

    Invariants (``check``): ``key -> block`` and ``block -> entry.key`` are inverse
    bijections between cached keys and cached blocks; evictable blocks are cached, and
    each is in the LRU order of exactly its own group.
    """

    def __init__(self, group_blocks: int = 1 << 62) -> None:
        if group_blocks <= 0:
            raise ValueError("group_blocks must be positive")
        self._block_of: dict[BlockKey, int] = {}
        self._entry: dict[int, tuple] = {}  # block -> CachedBlock's fields, as a tuple
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable, oldest first
        self._by_group: dict[int, OrderedDict[int, None]] = {}  # the same, per group
        self._group_blocks = group_blocks
        self._evicting: int | None = None  # the group ``evict`` takes blocks from
        self.evictions = 0

    @property
    def num_cached(self) -> int:
        return len(self._entry)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def is_cached(self, block: int) -> bool:
        return block in self._entry

    def is_evictable(self, block: int) -> bool:
        return block in self._lru

    def entry(self, block: int) -> CachedBlock | None:
        e = self._entry.get(block)
        return None if e is None else CachedBlock._make(e)

    def match(
        self, keys: Sequence[BlockKey], tokens_per_block: Sequence[Sequence[int]]
    ) -> list[int]:
        """Blocks of the longest verified cached prefix of ``keys`` (module docstring)."""
        if len(keys) != len(tokens_per_block):
            raise ValueError("keys and tokens_per_block differ in length")
        out: list[int] = []
        parent: BlockKey | None = None
        for key, toks in zip(keys, tokens_per_block, strict=True):
            block = self._block_of.get(key)
            if block is None:
                break
            _, stored_parent, stored_tokens = self._entry[block]
            if stored_parent != parent or stored_tokens != tuple(toks):
                break
            out.append(block)
            parent = key
        return out

    def add(
        self, block: int, key: BlockKey, tokens: Sequence[int], parent: BlockKey | None
    ) -> bool:
        """Cache ``block`` (in use) under ``key``; False, changing nothing, if ``key`` is
        already cached with another block.  Caching a block again with the same entry
        is a no-op; with another entry, ValueError."""
        entry = (key, parent, tuple(tokens))
        old = self._entry.get(block)
        if old is not None:
            if old != entry:
                raise ValueError(f"block {block} is already cached with other contents")
            return True
        if key in self._block_of:
            return False
        self._block_of[key] = block
        self._entry[block] = entry
        return True

    def add_chain(
        self,
        blocks: Sequence[int],
        keys: Sequence[BlockKey],
        tokens_per_block: Sequence[Sequence[int]],
        start: int,
    ) -> int:
        """``add`` blocks ``start ..`` of one sequence (``blocks`` / ``keys`` from its
        block 0; ``tokens_per_block`` from ``start``), each with the previous key as its
        parent; returns how many are cached now."""
        add, n = self.add, 0
        parent = keys[start - 1] if start else None
        for i, tokens in enumerate(tokens_per_block, start=start):
            key = keys[i]
            n += add(blocks[i], key, tokens, parent)
            parent = key
        return n

    def park(self, block: int) -> None:
        """``block`` (cached) lost its last reference: it becomes the most recent
        evictable block."""
        self._lru[block] = None
        group = block // self._group_blocks
        order = self._by_group.get(group)
        if order is None:
            order = self._by_group[group] = OrderedDict()
        order[block] = None

    def unpark(self, block: int) -> None:
        """``block`` (evictable) gained a reference: it is no longer evictable."""
        del self._lru[block]
        del self._by_group[block // self._group_blocks][block]

    def evict(self, n: int = 1) -> list[int]:
        """Uncache the ``n`` (<= ``num_evictable``) least recently parked blocks of the
        group being evicted (moving to the oldest evictable block's group whenever that
        one has none left) and return them."""
        if n > len(self._lru):
            raise ValueError(f"evict of {n} blocks; {len(self._lru)} are evictable")
        lru, by_group, entries, block_of = self._lru, self._by_group, self._entry, self._block_of
        out: list[int] = []
        group = by_group.get(self._evicting) if self._evicting is not None else None
        while len(out) < n:
            if not group:
                self._evicting = next(iter(lru)) // self._group_blocks
                group = by_group[self._evicting]
            block, _ = group.popitem(last=False)
            del lru[block]
            del block_of[entries.pop(block)[0]]
            out.append(block)
        self.evictions += n
        return out

    def drop_evictable(self) -> list[int]:
        """Uncache every evictable block (not counted as evictions); return them."""
        out = list(self._lru)
        self._lru.clear()
        self._by_group.clear()
        for block in out:
            del self._block_of[self._entry.pop(block)[0]]
        return out

    def check(self) -> None:
        """Raise AssertionError on a broken invariant (class docstring)."""
        assert len(self._block_of) == len(self._entry), "keys and cached blocks differ"
        for block, e in self._entry.items():
            assert self._block_of.get(e[0]) == block, f"block {block}: key maps elsewhere"
        for block in self._lru:
            assert block in self._entry, f"evictable block {block} is not cached"
            group = self._by_group.get(block // self._group_blocks, {})
            assert block in group, f"evictable block {block} is not in its group's order"
        assert sum(map(len, self._by_group.values())) == len(self._lru), "group orders differ"

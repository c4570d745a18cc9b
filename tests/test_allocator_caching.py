"""BlockAllocator with enable_caching: register / lookup / retain / free, LRU eviction,
accounting, and a stateful model of sequences sharing cached prefixes."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slabserve.kvcache import BlockAllocator, block_keys, block_tokens, blocks_needed

BS = 2


def _seq(a, toks, salt=None):
    """Allocate, compute (register) and return (blocks, keys, tokens) of a new sequence."""
    keys, bt = block_keys(toks, BS, salt=salt), block_tokens(toks, BS)
    blocks = a.allocate(blocks_needed(len(toks), BS))
    assert a.register_chain(blocks, keys, bt) == len(keys)
    return blocks, keys, bt


def _hits(a, toks, salt=None):
    return a.lookup(block_keys(toks, BS, salt=salt), block_tokens(toks, BS))


def test_caching_off_by_default():
    a = BlockAllocator(slab_blocks=4, max_blocks=8)
    keys, bt = block_keys([1, 2, 3, 4], BS), block_tokens([1, 2, 3, 4], BS)
    blocks = a.allocate(2)
    assert a.register_chain(blocks, keys, bt) == 0 and a.num_cached == 0
    a.free(reversed(blocks))
    assert a.lookup(keys, bt) == [] and a.num_free_uncached == a.num_free == 4
    assert a.check_integrity()


def test_register_lookup_retain_free():
    a = BlockAllocator(slab_blocks=4, max_blocks=8, enable_caching=True)
    toks = [1, 2, 3, 4, 5]
    blocks, keys, bt = _seq(a, toks)
    assert a.num_cached == 2 and a.num_evictable == 0 and a.num_used == 3
    assert _hits(a, toks) == blocks[:2]  # in use: shareable
    a.retain(blocks[:2])
    a.free(reversed(blocks))
    assert a.num_used == 2 and a.num_evictable == 0 and a.num_free_uncached == 2
    a.free(reversed(blocks[:2]))
    assert a.num_evictable == 2 and a.num_used == 0
    assert (a.num_free, a.num_available) == (4, 8) and a.can_allocate(8)
    hits = _hits(a, toks + [9, 9])
    assert hits == blocks[:2]
    a.retain(hits)  # evictable -> used
    assert a.num_evictable == 0 and a.refcount(hits[0]) == 1 and a.num_available == 6
    assert a.check_integrity()


def test_duplicate_key_keeps_existing_block():
    a = BlockAllocator(slab_blocks=4, max_blocks=8, enable_caching=True)
    first, keys, bt = _seq(a, [1, 2, 3, 4])
    dup = a.allocate(2)  # same prompt computed concurrently
    assert a.register_chain(dup, keys, bt) == 0
    assert not a.is_cached(dup[0]) and a.is_cached(first[0])
    a.free(reversed(dup))
    assert a.num_free_uncached == 2 and a.num_evictable == 0  # private: free list
    assert _hits(a, [1, 2, 3, 4]) == first
    assert a.register(first[0], keys[0], bt[0], None)  # idempotent
    with pytest.raises(ValueError):
        a.register(first[0], keys[1], bt[1], keys[0])  # cached under another key
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(ValueError):
        a.register(b, keys[0], bt[0], None)  # a free block
    assert a.check_integrity()


def test_retain_and_free_are_all_or_nothing():
    a = BlockAllocator(slab_blocks=4, max_blocks=8, enable_caching=True)
    x, y = a.allocate(2)
    a.free([y])
    with pytest.raises(ValueError):
        a.retain([x, y])  # y is free and uncached
    assert a.refcount(x) == 1
    with pytest.raises(ValueError):
        a.free([x, x])
    assert a.refcount(x) == 1 and a.check_integrity()


def test_lru_evicts_tail_before_head_and_least_recent_first():
    a = BlockAllocator(slab_blocks=6, max_blocks=6, enable_caching=True)
    p, q = [1, 1, 2, 2, 3, 3], [7, 7, 8, 8, 9, 9]
    pb, _, _ = _seq(a, p)
    qb, _, _ = _seq(a, q)
    a.free(reversed(pb))  # p freed first: least recent
    a.free(reversed(qb))
    hits = _hits(a, p)
    a.retain(hits)  # p touched: now q is the least recent
    a.free(reversed(hits))
    evicted = [a.allocate(1)[0] for _ in range(6)]
    assert evicted == qb[::-1] + pb[::-1] and a.evictions == 6
    assert a.allocate(1) is None and a.num_cached == 0
    assert a.check_integrity()


def test_eviction_stays_on_one_slab_until_it_has_none():
    """Eviction is LRU a slab at a time: the oldest evictable block's slab is drained
    (least recent first) before the next oldest block's slab, so the blocks handed out
    stay packed in few slabs."""
    a = BlockAllocator(slab_blocks=3, max_blocks=9, initial_slabs=3, enable_caching=True)
    seqs = [_seq(a, [10 * i + j for j in range(2 * 3)])[0] for i in range(3)]
    assert [b // 3 for s in seqs for b in s] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(3):  # park one block of each slab in turn: 0, 3, 6, 1, 4, 7, 2, 5, 8
        a.free([s[i] for s in seqs])
    order = [a.allocate(1)[0] for _ in range(9)]
    assert order == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # plain LRU gave 0, 3, 6, 1, ...
    assert a.evictions == 9 and a.check_integrity()


def test_one_allocate_evicts_many_in_the_order_of_single_evictions():
    """``allocate(n)`` evicting several blocks at once takes them in the order n
    allocations of one block would (across slabs too), and raises nothing on the way."""
    def parked():
        a = BlockAllocator(slab_blocks=3, max_blocks=9, initial_slabs=3, enable_caching=True)
        seqs = [_seq(a, [10 * i + j for j in range(2 * 3)])[0] for i in range(3)]
        for i in (2, 0, 1):
            a.free([s[i] for s in reversed(seqs)])
        return a

    one = parked()
    singles = [one.allocate(1)[0] for _ in range(7)]
    many = parked()
    assert sorted(many.allocate(7)) == sorted(singles) and many.evictions == 7
    assert many.num_cached == 2 and many.check_integrity()
    left = set(range(9)) - set(singles)
    assert {b for b in range(9) if many.is_cached(b)} == left


def test_register_chain_of_a_free_block_changes_nothing():
    a = BlockAllocator(slab_blocks=4, max_blocks=4, enable_caching=True)
    toks = [1, 2, 3, 4, 5, 6]
    keys, bt = block_keys(toks, BS), block_tokens(toks, BS)
    blocks = a.allocate(3)
    a.free([blocks[2]])
    with pytest.raises(ValueError, match="register of free block"):
        a.register_chain(blocks, keys, bt)
    assert a.num_cached == 0 and a.check_integrity()


def test_prefix_survives_partial_eviction():
    a = BlockAllocator(slab_blocks=3, max_blocks=3, enable_caching=True)
    toks = [1, 1, 2, 2, 3, 3]
    blocks, _, _ = _seq(a, toks)
    a.free(reversed(blocks))
    (got,) = a.allocate(1)
    assert got == blocks[2] and _hits(a, toks) == blocks[:2]
    assert a.check_integrity()


def test_free_list_then_eviction_then_growth():
    """The cache never grows the pool: cached blocks are evicted onto the free list
    before a slab is added, and the handout is lowest ids first."""
    grown = []
    a = BlockAllocator(slab_blocks=2, max_blocks=6, enable_caching=True, on_grow=grown.append)
    blocks, _, _ = _seq(a, [1, 1, 2, 2])  # slab 0, cached
    a.free(reversed(blocks))
    assert a.num_available == 6 and a.num_free == 2 and a.num_free_uncached == 0
    assert a.allocate(7) is None and a.num_cached == 2  # refused: nothing changed
    assert a.allocate(1) == [blocks[1]] and grown == [1]  # the LRU block (tail), no growth
    assert a.evictions == 1 and a.num_cached == 1
    assert a.allocate(3) == [blocks[0], 2, 3] and grown == [1, 2]  # evict, then grow
    assert a.num_cached == 0 and a.evictions == 2
    assert a.check_integrity()


def test_reset_cache_drops_only_evictable():
    a = BlockAllocator(slab_blocks=4, max_blocks=8, enable_caching=True)
    kept, _, _ = _seq(a, [1, 1])
    gone, _, _ = _seq(a, [2, 2, 3, 3])
    a.free(reversed(gone))
    assert a.reset_cache() == 2
    assert a.num_cached == 1 and a.num_evictable == 0 and a.evictions == 0
    assert _hits(a, [2, 2]) == [] and _hits(a, [1, 1]) == kept
    assert a.num_free_uncached == 3 and a.check_integrity()


def test_check_integrity_catches_a_cached_block_on_the_free_list():
    a = BlockAllocator(slab_blocks=4, max_blocks=8, enable_caching=True)
    blocks, _, _ = _seq(a, [1, 1])
    a._refcount[blocks[0]] = 0
    a._free.append(blocks[0])
    with pytest.raises(AssertionError):
        a.check_integrity()


class PrefixSharingMachine(RuleBasedStateMachine):
    """Sequences that look up and share cached prefixes, compute and register their full
    blocks, grow, and finish or are cancelled (possibly before computing anything);
    private allocations and cache resets in between.  The model: the refcount of every
    block, and the token prefix (with salt) whose K/V each computed block holds."""

    BASES = ((), (1, 1), (1, 1, 2, 2), (1, 1, 2, 2, 0, 0), (2, 0, 1))

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(slab_blocks=3, max_blocks=12, enable_caching=True)
        self.seqs: list[dict] = []
        self.private: list[list[int]] = []
        self.content: dict[int, tuple] = {}  # block -> (salt, prefix tokens) it holds
        self.history: list[tuple] = [((1, 1, 2, 2, 0, 0, 1, 1), "t")]  # finished prompts

    def _keys(self, toks, salt):
        return block_keys(toks, BS, salt=salt)

    def _check_hits(self, hits, toks, salt):
        assert len(set(hits)) == len(hits)
        for i, b in enumerate(hits):
            assert self.content[b] == (salt, tuple(toks[: (i + 1) * BS]))

    @rule(base=st.sampled_from(BASES), tail=st.lists(st.integers(0, 2), max_size=6),
          salt=st.sampled_from([None, "t"]))
    def admit(self, base, tail, salt):
        self._admit(list(base) + tail, salt)

    @rule(i=st.integers(0, 99), cut=st.integers(0, 3), tail=st.lists(st.integers(0, 2), max_size=4))
    def readmit(self, i, cut, tail):
        """A prompt that starts like a finished one (multi-turn chat, shared system
        prompt): its blocks are likely evictable hits."""
        toks, salt = self.history[i % len(self.history)]
        self._admit(list(toks[: len(toks) - cut]) + tail, salt)

    def _admit(self, toks, salt):
        if not toks:
            return
        keys, bt = self._keys(toks, salt), block_tokens(toks, BS)
        hits = self.a.lookup(keys, bt)
        self._check_hits(hits, toks, salt)
        avail = self.a.num_available - sum(self.a.refcount(b) == 0 for b in hits)
        self.a.retain(hits)
        assert self.a.num_available == avail
        need = blocks_needed(len(toks), BS) - len(hits)
        got = self.a.allocate(need)
        if got is None:
            assert need > avail
            self.a.free(reversed(hits))
            return
        self.seqs.append(dict(toks=toks, salt=salt, keys=keys, bt=bt, blocks=hits + got,
                              done=len(hits)))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def compute(self, i):
        s = self.seqs[i % len(self.seqs)]
        for j in range(s["done"], len(s["keys"])):
            self.content[s["blocks"][j]] = (s["salt"], tuple(s["toks"][: (j + 1) * BS]))
        n = self.a.register_chain(s["blocks"], s["keys"], s["bt"][s["done"]:], start=s["done"])
        assert n == sum(map(self.a.is_cached, s["blocks"][s["done"] : len(s["keys"])]))
        s["done"] = len(s["keys"])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), new=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def grow(self, i, new):
        s = self.seqs[i % len(self.seqs)]
        if s["done"] < len(s["keys"]):
            return  # its pending full blocks are not computed yet
        toks = s["toks"] + new
        got = self.a.allocate(blocks_needed(len(toks), BS) - len(s["blocks"]))
        if got is None:
            return
        k = len(s["keys"])
        parent = s["keys"][-1] if k else None
        s["keys"] += block_keys(toks[k * BS:], BS, salt=s["salt"], parent=parent)
        assert s["keys"] == self._keys(toks, s["salt"])
        s["toks"], s["bt"] = toks, block_tokens(toks, BS)
        s["blocks"] += got

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def finish_or_cancel(self, i):
        s = self.seqs.pop(i % len(self.seqs))
        self.a.free(reversed(s["blocks"]))
        self.history = [(tuple(s["toks"]), s["salt"])] + self.history[:3]

    @rule(n=st.integers(0, 4))
    def allocate_private(self, n):
        got = self.a.allocate(n)
        if got is not None:
            self.private.append(got)

    @precondition(lambda self: self.private)
    @rule()
    def free_private(self):
        self.a.free(self.private.pop())

    @rule()
    def reset_cache(self):
        evictable = self.a.num_evictable
        assert self.a.reset_cache() == evictable and self.a.num_evictable == 0

    @invariant()
    def consistent(self):
        assert self.a.check_integrity()
        refs: dict[int, int] = {}
        for blocks in [s["blocks"] for s in self.seqs] + self.private:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        assert all(self.a.refcount(b) == refs.get(b, 0) for b in range(self.a.capacity))
        assert self.a.num_used == len(refs)
        assert self.a.num_free == self.a.capacity - len(refs)

    def teardown(self):
        for s in self.seqs:
            self.a.free(reversed(s["blocks"]))
        for blocks in self.private:
            self.a.free(blocks)
        a = self.a
        assert a.num_used == 0 and a.num_free_uncached + a.num_evictable == a.capacity
        assert a.num_evictable == a.num_cached and a.check_integrity()


TestPrefixSharingMachine = PrefixSharingMachine.TestCase
TestPrefixSharingMachine.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None)

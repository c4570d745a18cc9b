import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slabserve.kvcache import BlockAllocator, BlockTable, blocks_needed


def test_allocate_free_accounting():
    grown = []
    a = BlockAllocator(slab_blocks=4, max_blocks=12, on_grow=grown.append)
    assert (a.capacity, a.num_free, a.num_used, a.num_available) == (4, 4, 0, 12)
    x = a.allocate(3)
    assert len(set(x)) == 3 and a.num_used == 3
    y = a.allocate(5)  # 1 free + one more slab
    assert grown == [1, 2] and a.capacity == 8 and a.num_used == 8
    assert not set(x) & set(y)
    assert a.allocate(5) is None  # only 4 left: nothing handed out
    assert a.num_used == 8 and a.check_integrity()
    a.free(x + y)
    assert a.num_used == 0 and a.num_free == 8 and a.num_available == 12
    assert a.check_integrity()


def test_refcounts_and_double_free():
    a = BlockAllocator(slab_blocks=2, max_blocks=4)
    (b,) = a.allocate(1)
    a.retain([b])
    assert a.refcount(b) == 2
    a.free([b])
    assert a.refcount(b) == 1 and a.num_used == 1
    a.free([b])
    assert a.num_used == 0
    with pytest.raises(ValueError):
        a.free([b])
    with pytest.raises(ValueError):
        a.retain([b])
    assert a.check_integrity()


def test_block_table_slots():
    t = BlockTable(block_size=4, blocks=[7, 2, 9])
    assert t.capacity() == 12 and t.slot(0) == (7, 0) and t.slot(5) == (2, 1)
    assert t.extra_blocks_for(12) == 0 and t.extra_blocks_for(13) == 1
    assert blocks_needed(0, 4) == 0 and blocks_needed(1, 4) == 1 and blocks_needed(8, 4) == 2


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / retain / free sequences keep every invariant; exhaustion returns
    None and leaks nothing."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(slab_blocks=3, max_blocks=20)
        self.held: list[list[int]] = []  # each entry: one reference to each block

    @rule(n=st.integers(0, 8))
    def allocate(self, n):
        before = self.a.num_used
        got = self.a.allocate(n)
        if got is None:
            assert n > self.a.num_available and self.a.num_used == before
        else:
            assert len(got) == n == len(set(got))
            assert self.a.num_used == before + n
            self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def retain(self, i):
        blocks = self.held[i % len(self.held)]
        self.a.retain(blocks)
        self.held.append(list(blocks))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.a.free(self.held.pop(i % len(self.held)))

    @invariant()
    def consistent(self):
        assert self.a.check_integrity()
        refs: dict[int, int] = {}
        for blocks in self.held:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        assert self.a.num_used == len(refs)
        assert all(self.a.refcount(b) == r for b, r in refs.items())

    def teardown(self):
        for blocks in self.held:
            self.a.free(blocks)
        assert self.a.num_used == 0 and self.a.check_integrity()


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


class CachingOnAllocatorMachine(AllocatorMachine):
    """The same rules with ``enable_caching=True`` and nothing registered: identical
    behaviour (no block is ever cached or evictable)."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(slab_blocks=3, max_blocks=20, enable_caching=True)

    @invariant()
    def nothing_cached(self):
        assert self.a.num_cached == self.a.num_evictable == self.a.evictions == 0
        assert self.a.num_free == self.a.num_free_uncached


TestCachingOnAllocatorMachine = CachingOnAllocatorMachine.TestCase
TestCachingOnAllocatorMachine.settings = settings(
    max_examples=30, stateful_step_count=60, deadline=None)

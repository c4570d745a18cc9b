"""Prefix-cache keys (kvcache/prefix.py) and hit verification under hash collisions."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slabserve.kvcache import BlockAllocator, block_keys, block_tokens, root_key
from slabserve.kvcache import prefix as prefix_mod

BS = 4


def _tokens(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def test_keys_cover_full_blocks_only():
    toks = _tokens(4 * BS + 3)
    keys = block_keys(toks, BS)
    assert len(keys) == 4 and len(block_tokens(toks, BS)) == 4
    assert all(isinstance(k, bytes) and len(k) == prefix_mod.DIGEST_BYTES for k in keys)
    assert len(set(keys)) == 4
    assert block_keys(toks[: BS - 1], BS) == [] and block_tokens(toks[: BS - 1], BS) == []
    assert block_tokens(toks, BS)[1] == tuple(toks[BS : 2 * BS])
    with pytest.raises(ValueError):
        block_keys(toks, 0)


def test_same_prefix_same_keys():
    head = _tokens(3 * BS, seed=1)
    a = block_keys(head + _tokens(2 * BS, seed=2), BS, salt="t")
    b = block_keys(head + _tokens(2 * BS + 1, seed=3), BS, salt="t")
    assert a[:3] == b[:3]
    assert not set(a[3:]) & set(b[3:])
    assert block_keys(head, BS, salt="t") == a[:3]  # deterministic


def test_salt_separates_every_key():
    toks = _tokens(5 * BS)
    chains = [block_keys(toks, BS, salt=s) for s in (None, "", "tenant-a", "tenant-b")]
    flat = [k for c in chains for k in c]
    assert len(set(flat)) == len(flat)
    assert root_key(None) != root_key("") != root_key("x")


@pytest.mark.parametrize("pos", [0, BS - 1, 2 * BS, 5 * BS - 1])
def test_one_token_changes_its_block_and_all_later_keys(pos):
    toks = _tokens(5 * BS + 2)
    changed = list(toks)
    changed[pos] += 1
    a, b = block_keys(toks, BS), block_keys(changed, BS)
    k = pos // BS
    assert a[:k] == b[:k]
    assert all(x != y for x, y in zip(a[k:], b[k:], strict=True))
    assert not set(a[k:]) & set(b[k:])


@given(
    toks=st.lists(st.integers(0, 2**40), max_size=40),
    cut=st.integers(0, 10),
    salt=st.sampled_from([None, "", "s"]),
)
def test_incremental_keys_equal_whole(toks, cut, salt):
    cut = min(cut * BS, len(toks) // BS * BS)
    whole = block_keys(toks, BS, salt=salt)
    head = block_keys(toks[:cut], BS, salt=salt)
    parent = head[-1] if head else None
    assert head + block_keys(toks[cut:], BS, salt=salt, parent=parent) == whole
    if head:  # the salt is carried by the parent
        assert block_keys(toks[cut:], BS, salt="other", parent=parent) == whole[len(head):]


def _cached(blocks_tokens_pairs, **kw):
    """An allocator holding one cached chain per (tokens, salt) entry, all evictable."""
    a = BlockAllocator(slab_blocks=8, max_blocks=64, enable_caching=True, **kw)
    for toks, salt in blocks_tokens_pairs:
        keys, bt = block_keys(toks, BS, salt=salt), block_tokens(toks, BS)
        blocks = a.allocate(len(keys))
        a.register_chain(blocks, keys, bt)
        a.free(reversed(blocks))
    return a


def test_lookup_hits_longest_prefix_and_is_pure():
    base = _tokens(4 * BS)
    a = _cached([(base, None)])
    other = base[: 2 * BS] + _tokens(2 * BS, seed=9)
    state = (a.num_free, a.num_evictable, a.evictions, [a.refcount(b) for b in range(8)])
    hits = a.lookup(block_keys(other, BS), block_tokens(other, BS))
    assert len(hits) == 2
    assert a.lookup(block_keys(base, BS), block_tokens(base, BS))[:2] == hits
    assert a.lookup(block_keys(base, BS, salt="x"), block_tokens(base, BS)) == []
    assert state == (a.num_free, a.num_evictable, a.evictions,
                     [a.refcount(b) for b in range(8)])
    with pytest.raises(ValueError):
        a.lookup(block_keys(base, BS), block_tokens(base, BS)[:-1])


def test_forced_collision_never_returns_other_tokens(monkeypatch):
    """Every digest equal: every key equal.  Only the token / parent check stands between
    a lookup and a wrong block."""
    monkeypatch.setattr(prefix_mod, "_digest", lambda data: b"\0" * prefix_mod.DIGEST_BYTES)
    a_toks = _tokens(3 * BS, seed=1)
    a = _cached([(a_toks, None)])
    assert a.num_cached == 1  # one key: the first block took it, the others stayed private
    for seed in range(2, 6):
        other = _tokens(3 * BS, seed=seed)
        assert a.lookup(block_keys(other, BS), block_tokens(other, BS)) == []
    same_head = a_toks[:BS] + _tokens(2 * BS, seed=7)
    (hit,) = a.lookup(block_keys(same_head, BS), block_tokens(same_head, BS))
    # the cached block's tokens stand at position 0 only: its parent is None
    shifted = _tokens(BS, seed=8) + a_toks[:BS]
    assert a.lookup(block_keys(shifted, BS), block_tokens(shifted, BS)) == []
    # a block registered at position 1 never answers for position 0
    a.reset_cache()
    (b,) = a.allocate(1)
    k = block_keys(a_toks, BS)
    assert a.register(b, k[1], a_toks[BS : 2 * BS], parent=k[0])
    probe = a_toks[BS : 2 * BS]
    assert a.lookup(block_keys(probe, BS), block_tokens(probe, BS)) == []


def _weak_digest(data):
    """Three possible keys: collisions everywhere, including between parent keys."""
    return bytes([saved_digest(data)[0] % 3]) * prefix_mod.DIGEST_BYTES


saved_digest = prefix_mod._digest


@pytest.mark.parametrize("digest", [lambda data: b"\0" * 16, _weak_digest])
@settings(max_examples=150, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 2), max_size=4 * BS), min_size=1, max_size=6),
    query=st.lists(st.integers(0, 2), max_size=4 * BS),
)
def test_collisions_never_return_other_tokens(digest, prompts, query):
    """Property: with colliding digests, each block a lookup returns holds exactly the
    query's tokens of that block (its prefix may differ: that takes a parent collision)."""
    prefix_mod._digest = digest
    try:
        a = BlockAllocator(slab_blocks=8, max_blocks=64, enable_caching=True)
        stored = {}  # block -> tokens it was registered with
        for toks in prompts:
            keys, bt = block_keys(toks, BS), block_tokens(toks, BS)
            blocks = a.allocate(len(keys))
            for i, b in enumerate(blocks):
                if a.register(b, keys[i], bt[i], keys[i - 1] if i else None):
                    stored[b] = bt[i]
        qt = block_tokens(query, BS)
        for i, b in enumerate(a.lookup(block_keys(query, BS), qt)):
            assert stored[b] == qt[i]
        assert a.check_integrity()
    finally:
        prefix_mod._digest = saved_digest

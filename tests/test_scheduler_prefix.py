"""Prefix caching in the scheduler, on the shadow executor (a wrong shared block changes
every later token): equal prompts are prefilled once, an extension of a cached prompt
starts on its blocks, preempted sharers resume onto cached blocks, a cancelled sharer
gives its references back, and eviction comes before preemption."""

from __future__ import annotations

from sched_fakes import make, reference, req


def _drain(s, ex, limit=2000):
    outs: dict[str, list[int]] = {}
    for _ in range(limit):
        if not s.has_work:
            return outs
        plan = s.schedule()
        for u in s.update(plan, ex.execute(plan)):
            outs.setdefault(u.request_id, []).append(u.token.token_id)
        s.check_integrity()
    raise AssertionError("did not drain")


def test_equal_prompts_prefill_once_and_extensions_reuse():
    s, ex = make(num_blocks=64, block_size=4, caching=True, max_step_tokens=64,
                 prefill_chunk=64)
    a = [req(f"n{i}", 21, max_tokens=5) for i in range(3)]  # n > 1: equal prompts
    for r in a:
        s.add(r)
    outs = _drain(s, ex)
    assert all(outs[r.request_id] == reference(r.prompt_tokens, 5) for r in a)
    assert s.prefix.hits == 2 * 20  # the later two start on 5 blocks of the first
    longer = req("ext", 33, max_tokens=3)  # the same base: extends the cached prompt
    s.add(longer)
    assert _drain(s, ex)["ext"] == reference(longer.prompt_tokens, 3)
    assert s.prefix.hits == 40 + 20  # the 5 prompt blocks (the output blocks differ)
    assert s.allocator.num_used == 0 and s.allocator.num_cached > 0


def test_sharers_survive_preemption_and_cancellation():
    s, ex = make(num_blocks=12, block_size=2, caching=True, max_step_tokens=16,
                 prefill_chunk=8, watermark_blocks=0)
    rs = [req(f"r{i}", 9 + i, max_tokens=6) for i in range(5)]  # shared prefixes
    for r in rs:
        s.add(r)
    outs: dict[str, list[int]] = {}
    for step in range(2000):
        if not s.has_work:
            break
        plan = s.schedule()
        for u in s.update(plan, ex.execute(plan)):
            outs.setdefault(u.request_id, []).append(u.token.token_id)
        if step == 6:
            s.abort("r2")  # cancel a sequence that shares blocks
        s.check_integrity()
    assert s.preemptions > 0 and s.prefix.hits > 0
    for r in rs:
        want = reference(r.prompt_tokens, 6)
        got = outs.get(r.request_id, [])
        assert got == (want[: len(got)] if r.request_id == "r2" else want)
    assert s.allocator.num_used == 0 and not s.prefix._in_flight
    assert s.allocator.check_integrity()


def test_cached_blocks_are_evicted_before_anyone_is_preempted():
    s, ex = make(num_blocks=16, block_size=2, caching=True, max_step_tokens=32,
                 prefill_chunk=32, watermark_blocks=0)
    first = req("a", 20, max_tokens=2, base=1)
    s.add(first)
    _drain(s, ex)
    assert s.allocator.num_cached == 10 and s.allocator.num_used == 0
    others = [req(f"b{i}", 9, max_tokens=4, base=3 + i) for i in range(2)]  # 14 of 16 blocks
    for r in others:
        s.add(r)
    outs = _drain(s, ex)
    assert all(outs[r.request_id] == reference(r.prompt_tokens, 4) for r in others)
    assert s.preemptions == 0 and s.allocator.evictions > 0

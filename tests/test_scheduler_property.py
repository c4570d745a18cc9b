"""Hypothesis: thousands of random steps (adds, aborts, steps) on a tiny block budget,
``check_integrity()`` after each; outputs equal the schedule-free reference; all blocks
come back.  With prefix caching on, prompts of the same base share prefixes (one is a
prefix of every longer one), so sequences share cached blocks, are preempted and aborted
while sharing, and must still produce the reference and leak nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_fakes import make, reference, req

from slabserve.scheduler.api import RequestError

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 24)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 3), st.just(0)),
    ),
    min_size=20, max_size=120,
)
configs = st.fixed_dictionaries(dict(
    num_blocks=st.sampled_from([4, 6, 8, 16]),
    block_size=st.sampled_from([1, 2, 4]),
    max_step_tokens=st.integers(1, 24),
    prefill_chunk=st.integers(1, 16),
    max_running=st.integers(1, 8),
    max_queued=st.integers(0, 12),
    watermark_blocks=st.sampled_from([0, 0, 0, 1, 2]),
    prefill_align=st.sampled_from([1, 1, 2, 3, 4]),
))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, script=ops, caching=st.booleans())
def test_random_schedules_keep_invariants(cfg, script, caching):
    s, ex = make(caching=caching, **cfg)
    budget, reqs, outs, aborted = cfg["max_step_tokens"], {}, {}, set()
    steps = 0

    def one_step():
        nonlocal steps
        plan = s.schedule()
        assert plan.num_tokens <= budget
        ids = [c.request_id for c in plan.chunks()]
        assert len(ids) == len(set(ids)) and not set(ids) & set(plan.preempted)
        for u in s.update(plan, ex.execute(plan)):
            outs.setdefault(u.request_id, []).append(u.token.token_id)
        s.check_integrity()
        steps += 1

    for i, (kind, a, b) in enumerate(script):
        if kind == "add":
            r = req(f"r{i}", a, max_tokens=b, base=i % 7 + 1)
            try:
                s.add(r)
                reqs[r.request_id] = r
            except RequestError as e:
                assert e.kind in ("queue_full", "kv_capacity")
        elif kind == "abort" and reqs:
            rid = sorted(reqs)[a % len(reqs)]
            if s.abort(rid):
                aborted.add(rid)
            s.check_integrity()
        else:
            for _ in range(a):
                one_step()
    for _ in range(5000):  # drain: everything admitted must finish
        if not s.has_work:
            break
        one_step()
    assert not s.has_work and s.allocator.num_used == 0
    assert not s.prefix._in_flight, "in-flight prefix keys leaked"
    assert s.allocator.check_integrity()
    for rid, r in reqs.items():
        got = outs.get(rid, [])
        want = reference(r.prompt_tokens, r.params.max_tokens)
        if rid in aborted:
            assert got == want[: len(got)]
        else:
            assert got == want


@settings(max_examples=60, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), min_size=2, max_size=10),
       block_size=st.sampled_from([1, 2]), budget=st.integers(2, 12))
def test_heavy_preemption_is_exact(jobs, block_size, budget):
    """A pool of 10 blocks under up to 10 concurrent requests: preemption most steps."""
    s, ex = make(num_blocks=10, block_size=block_size, max_step_tokens=budget,
                 prefill_chunk=4, watermark_blocks=0, max_queued=16)
    reqs = [req(f"r{i}", n, max_tokens=m, base=i + 1) for i, (n, m) in enumerate(jobs)]
    accepted = []
    for r in reqs:
        try:
            s.add(r)
            accepted.append(r)
        except RequestError as e:
            assert e.kind == "kv_capacity"
    outs: dict[str, list[int]] = {}
    for _ in range(5000):
        if not s.has_work:
            break
        plan = s.schedule()
        for u in s.update(plan, ex.execute(plan)):
            outs.setdefault(u.request_id, []).append(u.token.token_id)
        s.check_integrity()
    assert not s.has_work and s.allocator.num_used == 0
    for r in accepted:
        assert outs[r.request_id] == reference(r.prompt_tokens, r.params.max_tokens)

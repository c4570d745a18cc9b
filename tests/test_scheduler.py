"""Scheduler unit tests: fake executor (tests/sched_fakes.py), tiny block budgets."""

from __future__ import annotations

import pytest
from sched_fakes import EOS, make, reference, req

from slabserve.engine.step import SampledToken, StepOutput
from slabserve.scheduler.api import RequestError


def step(s, ex):
    plan = s.schedule()
    ups = s.update(plan, ex.execute(plan))
    s.check_integrity()
    return plan, ups


def run_all(s, ex, max_steps=10_000):
    outs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not s.has_work:
            return outs, reasons
        _, ups = step(s, ex)
        for u in ups:
            outs.setdefault(u.request_id, []).append(u.token.token_id)
            if u.finish_reason:
                reasons[u.request_id] = u.finish_reason
    raise AssertionError("scheduler made no progress")


def test_fcfs_admission_order_and_first_chunks():
    s, ex = make(num_blocks=64, max_step_tokens=100, prefill_chunk=100)
    for i, n in enumerate([5, 9, 3]):
        s.add(req(f"r{i}", n))
    plan, _ = step(s, ex)
    assert [c.request_id for c in plan.prefills] == ["r0", "r1", "r2"]
    assert [c.tokens for c in plan.prefills] == [req(f"r{i}", n).prompt_tokens
                                                for i, n in enumerate([5, 9, 3])]
    assert all(c.sample and c.start == 0 for c in plan.prefills)


def test_chunked_prefill_splits_a_long_prompt():
    s, ex = make(num_blocks=64, max_step_tokens=64, prefill_chunk=16)
    r = req("long", 50, max_tokens=2)
    s.add(r)
    chunks = [step(s, ex)[0].chunks()[0] for _ in range(4)]
    assert [(c.start, len(c.tokens), c.sample) for c in chunks] == [
        (0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert sum((c.tokens for c in chunks), ()) == r.prompt_tokens


def test_budget_respected_and_decodes_go_first():
    s, ex = make(num_blocks=64, max_step_tokens=8, prefill_chunk=32)
    for i in range(3):
        s.add(req(f"d{i}", 2, max_tokens=20))
    step(s, ex)  # three 2-token prefills
    s.add(req("long", 30, max_tokens=2))
    plan, _ = step(s, ex)
    assert [c.request_id for c in plan.decodes] == ["d0", "d1", "d2"]
    assert [(c.request_id, len(c.tokens)) for c in plan.prefills] == [("long", 5)]
    assert plan.num_tokens == 8
    for _ in range(5):
        plan, _ = step(s, ex)
        assert plan.num_tokens <= 8 and len(plan.decodes) >= 3


def test_outputs_match_reference_despite_chunking():
    s, ex = make(num_blocks=64, max_step_tokens=7, prefill_chunk=5)
    reqs = [req(f"r{i}", 3 + 4 * i, max_tokens=6, base=i + 1) for i in range(4)]
    for r in reqs:
        s.add(r)
    outs, reasons = run_all(s, ex)
    for r in reqs:
        assert outs[r.request_id] == reference(r.prompt_tokens, 6)
        assert reasons[r.request_id] == "length"
    assert s.allocator.num_used == 0


def test_preemption_newest_goes_first_then_resumes_exactly():
    # 6 blocks of 4 tokens = 24 slots; two sequences of 8 + 10 tokens cannot both finish
    s, ex = make(num_blocks=6, max_step_tokens=64, prefill_chunk=64, watermark_blocks=0)
    a, b = req("a", 8, max_tokens=10, base=1), req("b", 8, max_tokens=10, base=2)
    s.add(a)
    s.add(b)
    preempted: list[str] = []
    resumed_chunk = None
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while s.has_work:
        plan, ups = step(s, ex)
        preempted += plan.preempted
        for c in plan.prefills:
            if c.request_id == "b" and preempted and c.start == 0:
                resumed_chunk = c
        for u in ups:
            outs[u.request_id].append(u.token.token_id)
    assert preempted and set(preempted) == {"b"}, "the newest request is the victim"
    assert s.preemptions == len(preempted)
    assert resumed_chunk is not None
    n_out = resumed_chunk.output_index
    assert n_out > 0
    assert resumed_chunk.tokens[: 8 + n_out] == b.prompt_tokens + tuple(outs["b"][:n_out])
    assert outs["a"] == reference(a.prompt_tokens, 10)
    assert outs["b"] == reference(b.prompt_tokens, 10)
    assert s.allocator.num_used == 0


def test_admission_waits_for_blocks_fcfs():
    s, ex = make(num_blocks=4, max_step_tokens=64, prefill_chunk=64, watermark_blocks=0)
    s.add(req("a", 12, max_tokens=3))   # 3 blocks
    s.add(req("b", 8, max_tokens=2))    # 2 blocks: must wait for a
    s.add(req("c", 1, max_tokens=2))    # would fit, but no overtaking
    plan, _ = step(s, ex)
    assert [c.request_id for c in plan.chunks()] == ["a"]
    assert s.num_waiting == 2
    outs, _ = run_all(s, ex)
    assert set(outs) == {"a", "b", "c"}


def test_limits_and_errors():
    s, _ = make(num_blocks=8, block_size=4, max_context=40, max_queued=2)
    with pytest.raises(RequestError) as e:
        s.add(req("x", 0))
    assert e.value.kind == "invalid"
    with pytest.raises(RequestError) as e:
        s.add(req("x", 40))
    assert e.value.kind == "too_long" and e.value.param == "prompt"
    with pytest.raises(RequestError) as e:
        s.add(req("x", 30, max_tokens=11))
    assert e.value.kind == "too_long" and e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:  # 33 + 6 - 1 = 38 tokens > 8 blocks * 4
        s.add(req("x", 33, max_tokens=6))
    assert e.value.kind == "kv_capacity"
    s.add(req("a", 4))
    with pytest.raises(RequestError) as e:
        s.add(req("a", 4))
    assert e.value.kind == "invalid"
    s.add(req("b", 4))
    with pytest.raises(RequestError) as e:
        s.add(req("c", 4))
    assert e.value.kind == "queue_full"


def test_max_running_caps_the_batch():
    s, ex = make(num_blocks=64, max_running=2)
    for i in range(5):
        s.add(req(f"r{i}", 3, max_tokens=5))
    for _ in range(3):
        plan, _ = step(s, ex)
        assert s.num_running <= 2 and len(plan.chunks()) <= 2
    outs, _ = run_all(s, ex)
    assert len(outs) == 5


@pytest.mark.parametrize("params,reason,n", [
    (dict(stop_token_ids=(7,)), "stop", None),
    (dict(), "stop", None),                    # eos
    (dict(ignore_eos=True), "length", 5),
])
def test_finish_on_stop_ids_eos_and_length(params, reason, n):
    s, ex = make(num_blocks=64)
    s.add(req("r", 3, max_tokens=5, **params))
    stop_tok = 7 if params.get("stop_token_ids") else EOS
    outs = []
    for i in range(10):
        plan = s.schedule()
        tok = stop_tok if i == 2 else 11
        ups = s.update(plan, StepOutput({"r": SampledToken(tok)}))
        s.check_integrity()
        outs += ups
        if ups and ups[-1].finish_reason:
            break
    assert outs[-1].finish_reason == reason
    assert len(outs) == (n or 3)
    assert s.allocator.num_used == 0 and not s.has_work


def test_abort_frees_blocks_running_and_waiting():
    s, ex = make(num_blocks=8, max_running=1)
    s.add(req("a", 9, max_tokens=10))
    s.add(req("b", 5))
    step(s, ex)
    assert s.allocator.num_used == 3
    assert s.abort("a") and s.abort("b") and not s.abort("b")
    s.check_integrity()
    assert s.allocator.num_used == 0 and not s.has_work


def test_token_history_is_passed_only_when_a_penalty_needs_it():
    s, ex = make(num_blocks=64)
    s.add(req("pen", 3, max_tokens=6, presence_penalty=0.5))
    s.add(req("plain", 3, max_tokens=6))
    outs: dict[str, list[int]] = {"pen": [], "plain": []}
    for _ in range(4):
        plan, ups = step(s, ex)
        for c in plan.chunks():
            assert c.output_index == len(outs[c.request_id])
            if c.request_id == "pen":
                assert c.prompt == req("pen", 3).prompt_tokens
                assert c.output == tuple(outs["pen"])
            else:
                assert c.prompt == () and c.output == ()
        for u in ups:
            outs[u.request_id].append(u.token.token_id)


def test_prefill_align_cuts_non_final_chunks_to_multiples():
    s, ex = make(num_blocks=256, max_step_tokens=40, prefill_chunk=32, prefill_align=8)
    for i in range(3):
        s.add(req(f"d{i}", 2, max_tokens=30))
    step(s, ex)  # three 2-token prefills, then they decode every step
    r = req("long", 70, max_tokens=3)
    s.add(r)
    seen = []
    for _ in range(10):
        plan, _ = step(s, ex)
        seen += [c for c in plan.prefills if c.request_id == "long"]
        if seen and seen[-1].sample:
            break
    assert len(seen) == 3
    lens = [len(c.tokens) for c in seen[:-1]]
    # the budget left after 3 decodes is 37: cut to 32 (the chunk cap), 32, then the rest
    assert lens == [32, 32] and len(seen[2].tokens) == 6 and seen[2].sample
    assert all(n % 8 == 0 for n in lens)
    outs, _ = run_all(s, ex)
    assert outs["long"][-2:] == reference(r.prompt_tokens, 3)[-2:]


def test_prefill_align_keeps_progress_when_room_is_below_align():
    # 5 decodes leave 3 tokens of budget: below the 8-token alignment, the chunk is not cut
    s, ex = make(num_blocks=256, max_step_tokens=8, prefill_chunk=32, prefill_align=8)
    for i in range(5):
        s.add(req(f"d{i}", 1, max_tokens=40))
    step(s, ex)
    s.add(req("long", 20, max_tokens=2))
    plan, _ = step(s, ex)
    assert [(c.request_id, len(c.tokens)) for c in plan.prefills] == [("long", 3)]


def test_device_defaults():
    from slabserve.scheduler.config import SchedulerConfig

    cpu, gpu = SchedulerConfig.for_device(False), SchedulerConfig.for_device(True)
    assert (cpu.prefill_chunk, cpu.prefill_align) == (256, 1)
    # async scheduling: on for a GPU, off on CPU (nothing to overlap there), a flag wins
    assert (cpu.async_scheduling, gpu.async_scheduling) == (False, True)
    assert SchedulerConfig.for_device(False, async_scheduling=True).async_scheduling
    assert (gpu.max_step_tokens, gpu.prefill_chunk, gpu.prefill_align) == (16448, 2048, 2048)
    # the GPU alignment follows the effective chunk unless given
    assert SchedulerConfig.for_device(True, prefill_chunk=512).prefill_align == 512
    assert SchedulerConfig.for_device(True, prefill_align=256).prefill_align == 256
    assert SchedulerConfig.for_device(True, prefill_chunk=512, max_running=None).prefill_chunk \
        == 512
    # the GPU step follows the effective chunk and max_running unless given
    assert SchedulerConfig.for_device(True, prefill_chunk=512, max_running=8).max_step_tokens \
        == 8 * 512 + 8
    assert SchedulerConfig.for_device(True, max_step_tokens=1000).max_step_tokens == 1000
    with pytest.raises(ValueError):
        SchedulerConfig(prefill_align=0)


def test_cpu_steps_follow_the_model_size():
    """CPU defaults taken: a model of at most CPU_SMALL_MODEL_PARAMS gets 1024-token steps
    and 512-token chunks, a larger one keeps 512 / 256; a step size given on the command
    line, or a GPU, leaves the settings as they are."""
    from slabserve.scheduler.config import CPU_SMALL_MODEL_PARAMS, SchedulerConfig

    cpu = SchedulerConfig.for_device(False)
    assert cpu.steps_follow_model
    small = cpu.for_model(CPU_SMALL_MODEL_PARAMS)
    assert (small.max_step_tokens, small.prefill_chunk) == (1024, 512)
    assert not small.steps_follow_model and small.async_scheduling == cpu.async_scheduling
    assert cpu.for_model(CPU_SMALL_MODEL_PARAMS + 1) is cpu
    for given in (dict(prefill_chunk=128), dict(max_step_tokens=300)):
        fixed = SchedulerConfig.for_device(False, **given)
        assert not fixed.steps_follow_model and fixed.for_model(1000) is fixed
    gpu = SchedulerConfig.for_device(True)
    assert gpu.for_model(1000) is gpu


def test_parameter_count_counts_quantized_weights_unpacked(model_root):
    """The composition root's parameter count: a 4-bit quantized model counts as many as
    its float one (packed words unpacked, scales and biases left out)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load
    from models import make

    from slabserve.build import parameter_count

    model = load(str(make(model_root, "llama-gqa")))[0]
    n = parameter_count(model)
    assert n == sum(v.size for _, v in tree_flatten(model.parameters()))
    nn.quantize(model, group_size=32, bits=4)
    assert parameter_count(model) == n


def test_gpu_defaults_keep_chunks_whole_beside_decodes():
    """Eight streams decode while two long prompts prefill: every non-final chunk is a whole
    prefill_chunk, so chunk starts (and attention shapes) repeat across prompts."""
    from slabserve.scheduler.config import SchedulerConfig

    gpu = SchedulerConfig.for_device(True)
    cfg = {k: getattr(gpu, k) for k in ("max_step_tokens", "prefill_chunk", "prefill_align")}
    s, ex = make(num_blocks=4096, block_size=16, **cfg)
    for i in range(8):
        s.add(req(f"d{i}", 3, max_tokens=200))
    step(s, ex)
    s.add(req("p0", 9000, max_tokens=2))
    s.add(req("p1", 9000, max_tokens=2))
    starts: dict[str, list[tuple[int, int]]] = {"p0": [], "p1": []}
    for _ in range(12):
        plan, _ = step(s, ex)
        assert len(plan.decodes) >= 1
        for c in plan.prefills:
            starts[c.request_id].append((c.start, len(c.tokens)))
    for rid, chunks in starts.items():
        assert [st for st, _ in chunks] == [0, 2048, 4096, 6144, 8192], rid
        assert [n for _, n in chunks[:-1]] == [2048] * 4


def test_gpu_burst_of_long_prompts_gets_no_slivers():
    """Eight 16000-token prompts at once (the GPU load grid's 16k cell): the budget's
    left-over (max_running tokens beside the whole chunks) must not become a short chunk
    of a third prompt, whose later chunks would all start off the chunk alignment."""
    from slabserve.scheduler.config import SchedulerConfig

    gpu = SchedulerConfig.for_device(True)
    cfg = {k: getattr(gpu, k) for k in ("max_step_tokens", "prefill_chunk", "prefill_align")}
    s, ex = make(num_blocks=16 * 1024, block_size=16, max_context=32768, **cfg)
    for i in range(8):
        s.add(req(f"p{i}", 16000, max_tokens=8))
    chunks: dict[str, list[tuple[int, int]]] = {}
    for _ in range(200):
        if not s.has_work:
            break
        plan, _ = step(s, ex)
        for c in plan.prefills:
            chunks.setdefault(c.request_id, []).append((c.start, len(c.tokens)))
    assert not s.has_work
    for rid, cs in chunks.items():
        assert [st for st, _ in cs] == list(range(0, 16000, 2048)), rid
        assert cs[-1] == (14336, 1664), rid


def test_sliver_still_runs_when_the_step_has_nothing_else():
    """A budget below the alignment must not stall a lone prompt: it goes in slivers."""
    s, ex = make(num_blocks=64, max_step_tokens=100, prefill_chunk=2048, prefill_align=256)
    s.add(req("lone", 250, max_tokens=2))
    plan, _ = step(s, ex)
    assert [(c.start, len(c.tokens)) for c in plan.prefills] == [(0, 100)]
    outs, reasons = run_all(s, ex)
    assert reasons == {"lone": "length"}

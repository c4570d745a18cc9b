"""The decode-path selector: environment override (both names), per-layer cache, decline
reasons and fallback, profile lookup, rules, counts, trace."""

import json

import mlx.core as mx
import numpy as np
import pytest
from attention_cases import make_case

from slabserve import attention
from slabserve.attention import selector as sel_mod
from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.attention.profile import (
    Profile,
    ProfileEntry,
    device_id,
    load_for_device,
    profile_path,
)
from slabserve.attention.reference import reference_decode
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import Decision, Path, Reason, make_key, pow2_bucket
from slabserve.serve import make_selector

ENV_OURS = "SLABSERVE_PAGED_ATTENTION_NATIVE"
ENV_MLXCEL = "MLXCEL_PAGED_ATTENTION_NATIVE"


@pytest.fixture
def case():
    return make_case(8, 2, 64, 16, [40, 17, 65], 2, layers=3, seed=11)


@pytest.fixture
def fresh_default(monkeypatch):
    """A clean environment for the selector that ``slabserve serve`` builds from it."""
    monkeypatch.delenv(ENV_OURS, raising=False)
    monkeypatch.delenv(ENV_MLXCEL, raising=False)
    monkeypatch.delenv("SLABSERVE_ATTENTION_TRACE", raising=False)
    return monkeypatch


def run_step(sel, q, pool, batch, layers=3):
    """One decode step through a runner's attention runtime: every layer, then evaluate."""
    runtime = attention.AttentionRuntime(sel)
    step = DecodeBatch(batch.geom, batch.tables, batch.lengths)
    outs = [runtime.decode(q, pool, layer, step, 0.125) for layer in range(layers)]
    mx.eval(outs)
    return outs


@pytest.mark.parametrize("name,value,label", [
    (ENV_OURS, "1", ("native", "env_native")),
    (ENV_OURS, "on", ("native", "env_native")),
    (ENV_OURS, "0", ("gather", "env_gather")),
    (ENV_OURS, "no", ("gather", "env_gather")),
    (ENV_MLXCEL, "true", ("native", "env_native")),
    (ENV_MLXCEL, "off", ("gather", "env_gather")),
    (ENV_OURS, "maybe", ("native", "rule:cpu_native_all")),  # anything else = auto
])
def test_env_forces_path_and_counts_show_it(fresh_default, case, name, value, label):
    fresh_default.setenv(name, value)
    q, pool, batch = case
    sel = make_selector()
    outs = run_step(sel, q, pool, batch)
    assert sel.path_counts() == {label: 3}
    ref = reference_decode(q, pool, 2, batch, 0.125)
    assert np.abs(np.array(outs[2]) - ref).max() < 1e-5


def test_our_variable_wins_over_mlxcel(fresh_default, case):
    fresh_default.setenv(ENV_MLXCEL, "1")
    fresh_default.setenv(ENV_OURS, "0")
    sel = make_selector()
    run_step(sel, *case)
    assert sel.path_counts() == {("gather", "env_gather"): 3}


def test_per_layer_cache_is_hit_after_first_step(case):
    q, pool, batch = case
    s = Selector()
    run_step(s, q, pool, batch)
    assert (s.misses, s.hits) == (3, 0)
    for _ in range(4):
        run_step(s, q, pool, batch)
    assert (s.misses, s.hits) == (3, 12)
    # a new bucket (batch of one) is a new key: misses once per layer, then hits
    one = DecodeBatch(batch.geom, batch.tables[:1], batch.lengths[:1])
    run_step(s, q[:1], pool, one)
    run_step(s, q[:1], pool, one)
    assert (s.misses, s.hits) == (6, 15)


class Declining(DecodeAttention):
    name = "native"

    def decline(self, q, pool, batch):
        return "head_dim 96 unsupported (only (64, 128))"

    def __call__(self, q, pool, layer, batch, scale):
        raise AssertionError("a declined path must not run")


class Exploding(DecodeAttention):
    name = "native"

    def decline(self, q, pool, batch):
        return None

    def __call__(self, q, pool, layer, batch, scale):
        raise RuntimeError("kernel launch failed")


def test_forced_native_declines_with_reason_and_falls_back(case):
    q, pool, batch = case
    s = Selector(override=True, natives={"cpu": Declining()})
    out = s.run(q, pool, 0, batch, 0.125)
    assert np.abs(np.array(out) - reference_decode(q, pool, 0, batch, 0.125)).max() < 1e-5
    d = s.decide(q, pool, 0, batch)
    assert (d.path, d.reason) == (Path.GATHER, Reason.DECLINED)
    assert d.detail.startswith("head_dim 96")
    assert s.path_counts() == {("gather", "declined:head_dim_unsupported_only"): 2}


def test_native_cpu_decline_is_counted_with_its_reason(case):
    q, pool, batch = case
    s = Selector(override=True)
    out = s.run(q.astype(mx.int32), pool, 0, batch, 0.125)  # integer q: native declines
    assert out.shape == q.shape
    assert s.path_counts() == {("gather", "declined:dtype_unsupported"): 1}


def test_missing_kernel_module_declines(monkeypatch, case):
    monkeypatch.setitem(sel_mod.NATIVE_IMPLS, "cpu", ("slabserve.attention.no_such_kernel", "X"))
    s = Selector(override=True)
    s.run(*case[:2], 0, case[2], 0.125)
    assert s.path_counts() == {("gather", "declined:no_kernel_for_backend"): 1}
    assert sel_mod.load_native("tpu").decline(*case) == "no_kernel_for_backend"


def test_native_failure_at_run_falls_back_once_and_sticks(case):
    q, pool, batch = case
    s = Selector(override=True, natives={"cpu": Exploding()})
    out = s.run(q, pool, 1, batch, 0.125)
    assert np.abs(np.array(out) - reference_decode(q, pool, 1, batch, 0.125)).max() < 1e-5
    step = DecodeBatch(batch.geom, batch.tables, batch.lengths)
    s.run(q, pool, 1, step, 0.125)
    assert s.path_counts() == {("gather", "declined:native_failed"): 2}


def entry(batch, ctx, slabs, gather_ms, native_ms, dtype="float32"):
    return ProfileEntry("cpu", dtype, 64, 8, 2, 16, batch, ctx, slabs, gather_ms, native_ms)


def test_profile_decides_by_nearest_entry_and_round_trips(tmp_path, case):
    q, pool, batch = case  # B=3 -> bucket 4, ctx 65 -> bucket 256, "many" slabs
    prof = Profile("dev", "0", [entry(4, 1024, "many", 1.0, 2.0),  # gather faster
                                entry(16, 16384, "many", 2.0, 1.0),
                                entry(4, 256, "1", 2.0, 1.0)])  # other slab bucket
    path = prof.save(tmp_path / "p.json")
    s = Selector(profile=Profile.load(path))
    assert s.decide(q, pool, 0, batch) == Decision(Path.GATHER, Reason.PROFILE)
    # a profile without this geometry leaves the choice to the rules
    s2 = Selector(profile=Profile("dev", "0", [entry(4, 1024, "many", 1.0, 2.0, "float16")]))
    assert s2.decide(q, pool, 0, batch) == Decision(Path.NATIVE, Reason.RULE, "cpu_native_all")
    # a profile entry where native declined never picks native
    assert entry(4, 1024, "1", 3.0, None).faster == "gather"
    # a near tie (within 5%) is left to the rules
    tie = Selector(profile=Profile("dev", "0", [entry(4, 256, "many", 1.0, 1.04)]))
    assert tie.decide(q, pool, 0, batch) == Decision(Path.NATIVE, Reason.RULE, "cpu_native_all")


def test_profile_is_found_per_device(tmp_path):
    prof = Profile(device_id(), mx.__version__, [entry(1, 1024, "1", 1.0, 0.5)])
    prof.save(profile_path(tmp_path))
    assert load_for_device(tmp_path).entries == prof.entries
    assert load_for_device(tmp_path / "elsewhere") is None
    (profile_path(tmp_path)).write_text(json.dumps({"version": 99}))
    assert load_for_device(tmp_path) is None


def test_key_buckets(case):
    q, pool, batch = case
    key = make_key(q, pool, batch, "cpu")
    assert key == ("cpu", "float32", 64, 8, 2, 16, 4, 256, "many")
    assert [pow2_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
    one = DecodeBatch(batch.geom, [t[:1] for t in batch.tables], [5, 5, 5])
    assert make_key(q, pool, one, "cpu").slabs_bucket in ("1", "many")
    assert sel_mod.RULES["metal"](key)[0] is Path.GATHER  # unverified until measured


def test_trace_writes_one_line_per_step_and_layer(tmp_path, case):
    q, pool, batch = case
    trace = tmp_path / "trace.jsonl"
    s = Selector(override=False, trace=trace)
    for _ in range(2):
        step = DecodeBatch(batch.geom, batch.tables, batch.lengths)
        for layer in range(3):
            s.run(q, pool, layer, step, 0.125)
    s.close()
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert [(r["step"], r["layer"]) for r in lines] == [(i, j) for i in (1, 2) for j in range(3)]
    assert lines[0] == {"step": 1, "layer": 0, "batch": 3, "max_context": 65,
                        "total_context": 122, "slabs": 2, "path": "gather",
                        "reason": "env_gather"}


def test_trace_path_from_environment(fresh_default, tmp_path, case):
    fresh_default.setenv("SLABSERVE_ATTENTION_TRACE", str(tmp_path / "t.jsonl"))
    sel = make_selector()
    run_step(sel, *case)
    sel.close()
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 3


def test_first_decision_of_each_kind_is_logged_once(caplog, case):
    q, pool, batch = case
    s = Selector(override=True, natives={"cpu": Declining()})
    with caplog.at_level("INFO", logger="slabserve.attention"):
        for _ in range(3):
            step = DecodeBatch(batch.geom, batch.tables, batch.lengths)
            for layer in range(3):
                s.decide(q, pool, layer, step)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "declined:head_dim" in msgs[0]


class Recording(DecodeAttention):
    """A native path that works (gather's arithmetic) and counts its calls."""

    name = "native"

    def __init__(self) -> None:
        self.calls = 0
        self.inner = attention.GatherSDPA()

    def decline(self, q, pool, batch):
        return None

    def __call__(self, q, pool, layer, batch, scale):
        self.calls += 1
        return self.inner(q, pool, layer, batch, scale)


def test_set_override_switches_path_and_reason_from_the_next_step(case):
    q, pool, batch = case
    native = Recording()
    s = Selector(natives={"cpu": native})

    def step():
        b = DecodeBatch(batch.geom, batch.tables, batch.lengths)
        outs = [s.run(q, pool, layer, b, 0.125) for layer in range(3)]
        assert np.abs(np.array(outs[2]) - reference_decode(q, pool, 2, b, 0.125)).max() < 1e-5
        return b

    step()
    auto = ("native", "rule:cpu_native_all")
    assert s.path_counts() == {auto: 3} and native.calls == 3
    assert s.set_override(False) is None and s.override is False
    in_flight = step()
    assert s.path_counts() == {auto: 3, ("gather", "env_gather"): 3} and native.calls == 3
    assert s.set_override(True) is False
    step()
    assert s.path_counts() == {auto: 3, ("gather", "env_gather"): 3,
                               ("native", "env_native"): 3} and native.calls == 6
    # a step begun before a switch keeps its slots (the engine switches between steps)
    assert s.decide(q, pool, 0, in_flight).reason is Reason.ENV_GATHER
    assert s.set_override(None) is True
    step()
    assert s.path_counts()[auto] == 6 and native.calls == 9
    assert s.misses == 12  # every switch cleared the per-layer cache


@pytest.mark.parametrize("bad", [1, 0, "native", "auto"])
def test_set_override_refuses_anything_but_bool_or_none(bad):
    s = Selector(override=False)
    with pytest.raises(ValueError):
        s.set_override(bad)
    assert s.override is False

"""bench/prefix_overhead.py on the embedded tiny model: both engines run the same closed-loop
workload to the end, nothing hits the cache, greedy tokens agree on and off, every block
comes back, and the JSON carries what the doc's tables read.  No timed assertions."""

from __future__ import annotations

import json

import pytest

from slabserve.bench import prefix_overhead as po

ARGV = ["--embedded", "tiny:float32", "--requests", "6", "--prompt", "80", "--max-tokens", "4",
        "--concurrency", "2", "--rounds", "1", "--warmup", "1"]
RUN_FIELDS = {"setting", "tag", "busy_s", "output_tokens", "tok_s", "steps", "prefill_tokens",
              "schedule_ms", "execute_ms", "forward_ms", "update_ms", "slabs_per_step",
              "pool_slabs", "cached_blocks", "paths", "preemptions", "queries", "hits",
              "evictions"}


def test_main_runs_both_engines_token_exact_with_no_hits(tmp_path, capsys):
    assert po.main([*ARGV, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu-tiny-float32.json").read_text())
    assert data["meta"]["config"]["requests"] == 6 and data["meta"]["engine"]["block_size"] == 16
    assert data["hits"] == 0 and data["outputs_equal"] is True
    assert len(data["warmups"]) == 2 and len(data["rounds"]) == 1
    (rd,) = data["rounds"]
    assert rd["order"] == ["on", "off"] and set(rd["runs"]) == {"on", "off"}
    on, off = rd["runs"]["on"], rd["runs"]["off"]
    assert rd["on_over_off"] == pytest.approx(on["tok_s"] / off["tok_s"])
    assert data["on_over_off_median"] == pytest.approx(rd["on_over_off"])
    for s, r in rd["runs"].items():
        assert set(r) == RUN_FIELDS and r["setting"] == s
        assert r["output_tokens"] == 6 * 4 and r["tok_s"] > 0 and r["steps"] > 0
        assert r["prefill_tokens"] == 6 * 80 and r["queries"] == 6 * 80
        assert r["hits"] == 0 and r["preemptions"] == 0 and r["evictions"] == 0
        assert r["paths"] and r["slabs_per_step"] >= 1
    # the caching engine did cache: 5 full blocks of each of 12 requests (80 + 3 tokens
    # computed), warm-up included; the other caches nothing
    assert on["cached_blocks"] == 12 * 5 and off["cached_blocks"] == 0
    assert set(data["settings"]) == {"on", "off"}
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| median |")


def test_engines_differ_only_in_caching_and_prompts_never_share_a_first_token():
    from slabserve import env
    from slabserve.engine.loader import load

    cfg = po.BenchConfig(model="tiny", dtype="float32", requests=40, prompt=20, rounds=3,
                         warmup=1)
    model, tok, path = load("embedded:tiny", "float32", cache_dir=env.cache_dir())
    stacks = po.build_stacks(cfg, model, tok, path)
    on, off = stacks["on"].runner, stacks["off"].runner
    assert on.allocator.caching and not off.allocator.caching
    assert on.geom == off.geom and on.allocator.max_blocks == off.allocator.max_blocks
    assert stacks["on"].scheduler.cfg == stacks["off"].scheduler.cfg
    sets = po.make_prompts(cfg, 259)
    assert [len(s) for s in sets] == [40] * 4
    firsts = [p[0] for s in sets for p in s]
    assert len(set(firsts)) == 160 and all(len(p) == 20 for s in sets for p in s)
    with pytest.raises(ValueError, match="distinct first tokens"):
        po.make_prompts(po.BenchConfig(requests=100, rounds=2, warmup=1), 259)


class _FakeRun:
    def __init__(self, name, steps, log):
        self.name, self.left, self.log = name, steps, log

    @property
    def done(self):
        return self.left == 0

    def step(self):
        self.left -= 1
        self.log.append(self.name)


def test_lockstep_alternates_which_engine_steps_first_and_finishes_both():
    log = []
    po.lockstep([_FakeRun("a", 3, log), _FakeRun("b", 5, log)])
    assert log == ["a", "b", "b", "a", "a", "b", "b", "b"]

"""bench/prefix_lookup.py at small sizes: every operation is timed, the scheduler runs the
same steps with caching on and off, and the JSON carries what the docs' tables read.  No
timed assertions."""

from __future__ import annotations

import json

import pytest

from slabserve.bench import prefix_lookup as pl

ARGV = ["--prompt", "512", "--cached", "20", "--repeat", "2", "--requests", "4",
        "--step-prompt", "100", "--max-tokens", "3", "--concurrency", "2", "--rounds", "2"]


def test_main_times_each_operation_and_both_settings(tmp_path, capsys):
    assert pl.main([*ARGV, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "prefix-lookup.json").read_text())
    assert data["meta"]["config"]["cached"] == 20
    assert set(data["per_prompt"]) == {"keys", "lookup_hit", "lookup_miss", "admit",
                                       "register", "evict"}
    assert all(v > 0 for v in data["per_prompt"].values())
    on, off = data["per_step"]["on"], data["per_step"]["off"]
    assert on["steps_per_run"] == off["steps_per_run"] > 4
    assert on["schedule_ms"] > 0 and off["update_ms"] > 0
    assert "| on - off |" in capsys.readouterr().out


def test_the_cached_allocator_holds_the_prompt_head_evictable():
    from slabserve.kvcache import block_keys, block_tokens

    toks = list(range(1, 16 * 30 + 1))
    a = pl._cached_allocator(toks, 12)
    assert a.num_evictable == a.num_cached == 12 and a.num_used == 0
    assert len(a.lookup(block_keys(toks, 16), block_tokens(toks, 16))) == 12
    assert a.check_integrity()


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        pl.parse_args(["--prompt", "100", "--cached", "20"])

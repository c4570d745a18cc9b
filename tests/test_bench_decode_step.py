"""bench/decode_step.py: the JSON it writes, the paths it forces, its fast fill and its
block accounting, on the embedded tiny model."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from slabserve.attention.base import DecodeBatch
from slabserve.attention.gather import gather_kv
from slabserve.attention.selector import Selector
from slabserve.bench import decode_step as ds
from slabserve.scheduler.api import SamplingParams


@pytest.fixture(scope="module")
def loaded():
    cfg = ds.BenchConfig(model="tiny", batches=(2,), contexts=(47,), steps=2, warmup=1,
                         mem_bytes=1 << 30)
    runner, executor, weights = ds.load_runner(cfg)
    return cfg, runner, executor, weights


def test_main_writes_a_row_per_path_and_forces_each_path(tmp_path, capsys):
    argv = ["--embedded", "tiny", "--batches", "2", "--contexts", "40", "--steps", "2",
            "--warmup", "1", "--mem-gb", "1", "--out", str(tmp_path)]
    assert ds.main(argv) == 0
    data = json.loads((tmp_path / "cpu-tiny-float32.json").read_text())
    layers = data["meta"]["geometry"]["layers"]
    (cell,) = data["cells"]
    assert cell["skipped"] is None and (cell["batch"], cell["ctx"]) == (2, 40)
    assert set(cell["paths"]) == {"native", "gather", "auto"}
    for r in cell["paths"].values():
        assert len(r["steps_ms"]) == 2 and min(r["steps_ms"]) > 0
        assert 0 < r["forward_median_ms"] <= r["p90_ms"]
        assert r["tok_s"] == pytest.approx(2e3 / r["median_ms"])
    # every layer of every round (warm-up included) ran the forced path, and only it
    assert cell["paths"]["native"]["used"] == {"native:env_native": 3 * layers}
    assert cell["paths"]["gather"]["used"] == {"gather:env_gather": 3 * layers}
    assert sum(cell["paths"]["auto"]["used"].values()) == 3 * layers
    assert all(r["as_forced"] for r in cell["paths"].values())
    assert cell["free_blocks_after"] == cell["free_blocks_before"]
    # same filled K/V, same first tokens: the paths read the same pages
    assert cell["paths"]["native"]["first_tokens"] == cell["paths"]["gather"]["first_tokens"]
    ratio = cell["paths"]["gather"]["median_ms"] / cell["paths"]["native"]["median_ms"]
    assert cell["gather_over_native"] == pytest.approx(ratio)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| 2 | 40 |")


def test_fast_fill_is_random_everywhere_and_decode_writes_position_ctx(loaded):
    cfg, runner, executor, _ = loaded
    free0 = runner.allocator.num_free
    ctx, batch = 47, 2
    tables = ds.fast_fill(runner, batch, ctx, seed=3)
    old = runner.attention.selector
    try:
        view = DecodeBatch(runner.geom, [list(t) for t in tables], [ctx + 1] * batch)
        before = []
        for layer in range(runner.geom.num_layers):
            k, v = (np.array(x.astype(mx.float32)) for x in gather_kv(runner.pool, layer, view))
            for x in (k, v):
                assert np.all(x[:, :, :ctx] != 0), "a filled position is still zero"
                assert 0.8 < x[:, :, :ctx].std() < 1.2
            before.append(k)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        runner.attention.selector = Selector(override=True)
        plan = ds.plan_step(runner, tables, [5, 7], ctx, 0, params)
        executor.execute(plan)
        for layer in range(runner.geom.num_layers):
            k = np.array(gather_kv(runner.pool, layer, view)[0].astype(mx.float32))
            np.testing.assert_array_equal(k[:, :, :ctx], before[layer][:, :, :ctx])
            assert np.all(k[:, :, ctx] != before[layer][:, :, ctx])
    finally:
        runner.attention.selector = old
        for t in tables:
            runner.allocator.free(t)
    assert runner.allocator.num_free == free0


def test_run_cell_releases_every_block_even_after_growing_tables(loaded):
    cfg, runner, executor, weights = loaded
    free0 = runner.allocator.num_free
    # ctx 47 + 3 rounds: positions 47..49 cross into a fourth block during the steps
    selector = runner.attention.selector
    cells = ds.run(cfg, runner, executor, weights, log=lambda s: None)
    assert runner.attention.selector is selector  # the runner's own selector is restored
    (cell,) = cells
    assert cell["free_blocks_before"] == free0 == runner.allocator.num_free
    assert runner.allocator.check_integrity()
    full, short = ds.tables(cells, cfg.paths)
    assert full.count("\n| 2 | 47 |") == 3 and short.splitlines()[-1].startswith("| 2 | 47 |")


def test_cells_beyond_the_memory_budget_are_skipped_with_a_reason(loaded):
    cfg, runner, executor, weights = loaded
    big = ds.BenchConfig(model="tiny", batches=(64,), contexts=(1 << 20,), steps=1, warmup=0,
                         mem_bytes=cfg.mem_bytes)
    (cell,) = ds.run(big, runner, executor, weights, log=lambda s: None)
    assert cell["paths"] == {} and "blocks" in cell["skipped"]


def test_a_declined_native_is_shown_and_gets_no_ratio():
    def row(used: dict, forced: bool) -> dict:
        return dict(used=used, as_forced=forced, median_ms=2.0, p90_ms=2.5,
                    forward_median_ms=1.5, tok_s=500.0)

    cell = dict(batch=1, ctx=1024, skipped=None, gather_over_native=None, paths=dict(
        native=row({"gather:declined:head_dim": 12}, False),
        gather=row({"gather:env_gather": 12}, True),
        auto=row({"gather:declined:head_dim": 12}, True)))
    full, short = ds.tables([cell], ds.PATHS)
    last = short.splitlines()[-1]
    assert "2.00 (ran gather)" in last and last.endswith("| - |")
    assert "| native | gather:declined:head_dim |" in full


def test_parsing():
    assert ds.parse_tokens("4k") == 4096 and ds.parse_tokens("256") == 256
    assert ds.parse_model("llama-3.2-1b:bfloat16") == ("llama-3.2-1b", "bfloat16")
    assert ds.parse_model("tiny") == ("tiny", "float32")
    with pytest.raises(ValueError):
        ds.parse_model("nope")
    with pytest.raises(ValueError):
        ds.BenchConfig(paths=("native", "other"))

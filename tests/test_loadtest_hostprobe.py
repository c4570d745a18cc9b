"""The host probe (loadtest/hostprobe.py): timed before every run of a grid, shown per
configuration in the comparison table and beside each twin's goal line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slabserve.loadtest import grid as grid_mod
from slabserve.loadtest.compare import comparison_markdown, goal_checks
from slabserve.loadtest.grid import GridSpec, run_grid
from slabserve.loadtest.hostprobe import _work, host_probe_ms
from slabserve.loadtest.metrics import summarize
from slabserve.loadtest.report import row
from slabserve.loadtest.runner import RunResult, RunSpec


def _result(label: str, tok_s: float, probe: float | None) -> RunResult:
    spec = RunSpec(context=64, concurrency=8, max_tokens=8, requests=4)
    s = replace(summarize([], 8), output_tok_s=tok_s)
    return RunResult(label, spec, s, None, (), host_probe_ms=probe)


def test_probe_times_a_fixed_workload():
    assert _work(10) == _work(10) > 0  # deterministic work, not skipped
    assert host_probe_ms(passes=1, ops=1000) > 0.0
    with pytest.raises(ValueError):
        host_probe_ms(passes=0)
    with pytest.raises(ValueError):
        host_probe_ms(ops=0)


def test_run_grid_probes_the_host_before_each_run(monkeypatch):
    order: list = []

    async def run_once(ep, spec, prompts, label, progress):
        order.append(("run", spec.concurrency))
        return RunResult(label, spec, summarize([], spec.max_tokens), None, ())

    def probe():
        order.append(("probe",))
        return 10.0 + len(order)

    monkeypatch.setattr(grid_mod, "run_once", run_once)
    monkeypatch.setattr(grid_mod, "host_probe_ms", probe)
    grid = GridSpec((96,), (1, 2), 8)
    got = run_grid(None, grid, {(96, c): ["p"] * 4 for c in (1, 2)}, "x", False)
    assert order == [("probe",), ("run", 1), ("probe",), ("run", 2)]
    assert [r.host_probe_ms for r in got] == [11.0, 13.0]
    assert row(got[1])["host_probe_ms"] == 13.0


def test_table_and_twin_goal_show_the_host_probe():
    results = [_result("auto", 1000.0, 25.0), _result("twin", 740.0, 30.0),
               _result("mlx_lm", 500.0, None)]
    table = comparison_markdown(results, ["auto", "twin", "mlx_lm"])
    head, _, cell = table.splitlines()
    assert head.rstrip(" |").endswith("host probe ms")
    assert cell.rstrip(" |").endswith("auto 25 / twin 30")
    line = next(x for x in goal_checks(results, twins=["twin"]) if "twin/auto" in x)
    assert "host probe twin/auto 1.20" in line and line.endswith("FAIL")
    # without probes (older results): no note, the verdict as before
    bare = [replace(r, host_probe_ms=None) for r in results]
    line = next(x for x in goal_checks(bare, twins=["twin"]) if "twin/auto" in x)
    assert "host probe" not in line and line.endswith("FAIL")
    assert comparison_markdown(bare, ["auto"]).splitlines()[2].rstrip(" |").endswith("-")

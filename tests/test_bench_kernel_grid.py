"""``slabserve bench cuda-kernel --grid`` (bench/kernel_grid.py) on CPU: the launch forms,
the per-form medians from a trace, and a cell end to end with the kernels recorded instead
of compiled (tests/cuda_fakes.py) and the profiler's trace made from those launches."""

from __future__ import annotations

import mlx.core as mx
import pytest
from cuda_fakes import FakeKernel

from slabserve.attention.native_cuda import NativeCUDA
from slabserve.bench import device_time, kernel_grid
from slabserve.bench.device_time import MARK


def test_launch_forms():
    forms = kernel_grid.launches(8)
    assert forms[0].label == "plan" and forms[0].chunks is None
    assert len(forms) == 1 + len(kernel_grid.CHUNKS) * 2 * 2
    assert {(f.pages, f.fused) for f in forms[1:]} == {(1, True), (1, False), (8, True),
                                                        (8, False)}
    assert len(kernel_grid.launches(1, (1, 4))) == 1 + 2 * 2  # MP 1 is the plan's


def test_launch_times_are_medians_per_form():
    steps = [[(0.0, 10.0, "fused")], [(0.0, 12.0, "fused")], [(0.0, 11.0, "fused")],
             [(0.0, 6.0, "split"), (7.0, 2.0, "merge")],
             [(0.0, 5.0, "split"), (6.0, 3.0, "merge")],
             [(0.0, 7.0, "split"), (8.0, 2.0, "merge")]]
    fused, split = kernel_grid.launch_times(steps, 2, 3)
    assert fused == dict(kernels=1, device_us=11.0, main_us=11.0, merge_us=0.0)
    assert split == dict(kernels=2, device_us=8.0, main_us=6.0, merge_us=2.0)


def _fake_trace(log: list):
    """A trace whose step i holds the kernels launched during it: the main launch lasting
    its grid's chunks in microseconds, a merge 0.5."""
    def trace(step, n):
        events = []
        for i in range(n):
            start = len(log)
            step(i)
            t0 = 1000.0 * i
            events.append(dict(ph="X", cat="user_annotation", name=f"{MARK}{i}", ts=t0,
                               dur=900.0))
            for j, k in enumerate(log[start:]):
                merge = "merge" in k["spec"]["name"]
                events.append(dict(ph="X", cat="kernel", name=k["spec"]["name"],
                                   ts=t0 + 10 * j, dur=0.5 if merge else float(k["grid"][1])))
        return events
    return trace


@pytest.mark.parametrize("hq, hkv, dt, variant", [(14, 2, mx.bfloat16, "mma"),
                                                  (32, 8, mx.float16, "lean")])
def test_cell_end_to_end(monkeypatch, hq, hkv, dt, variant):
    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    monkeypatch.setattr(NativeCUDA, "_device_reason", lambda self: None)
    monkeypatch.setattr(NativeCUDA, "_probe", lambda self, q, pool: None)
    monkeypatch.setattr(device_time, "trace", _fake_trace(log))
    cell = kernel_grid.grid_cell(hq, hkv, 64, dt, 1, 1024, chunk_list=(1, 8, 64), reps=3)
    assert (cell["variant"], cell["plan_chunks"], cell["mp"]) == (variant, 64, 8)
    rows = {r["launch"]: r for r in cell["rows"]}
    assert len(rows) == 1 + 3 * 2 * 2
    # one chunk: the direct kernel whatever the merge form asked
    assert rows["c1 mp1 fused"]["kernels"] == rows["c1 mp8 split"]["kernels"] == 1
    assert rows["c64 mp8 fused"] == dict(launch="c64 mp8 fused", kernels=1, device_us=64.0,
                                         main_us=64.0, merge_us=0.0)
    assert rows["c64 mp1 split"]["device_us"] == 64.5 and rows["c8 mp1 split"]["kernels"] == 2
    # the plan at B=1: a 64-chunk grid, more than 8 chunks: split + merge for both variants
    assert rows["plan"] == dict(launch="plan", kernels=2, device_us=64.5, main_us=64.0,
                                merge_us=0.5)
    assert "| c64 mp8 fused | 1 | 64.0 | 64.0 | 0.0 |" in kernel_grid.grid_markdown(cell)


def test_run_grid_declines_without_device_time(monkeypatch, capsys):
    monkeypatch.setattr(device_time, "reason", lambda: "needs a CUDA device")
    assert kernel_grid.run_grid([(1, 1024)], ["14/2/64/bf16"]) is None
    assert "grid: device time needs a CUDA device; skipped" in capsys.readouterr().out

"""bench/decode_phases.py and bench/device_time.py: the device phase's kernel accounting
on a synthetic CUPTI trace, and the bench's table and JSON with and without it on the
embedded tiny model (this CPU has no CUDA: the real profiler declines here)."""

from __future__ import annotations

import json

import pytest

from slabserve.bench import decode_phases as dp
from slabserve.bench import device_time as dt


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return dict(ph="X", name=name, cat=cat, ts=ts, dur=dur)


def test_split_steps_gives_each_range_the_kernels_that_start_in_it():
    events = [
        _x(f"{dt.MARK}0", "user_annotation", 100, 50),
        _x(f"{dt.MARK}1", "user_annotation", 200, 50),
        _x(f"{dt.MARK}2", "user_annotation", 300, 10),
        _x("gemv", "kernel", 110, 5),
        _x("attention", "kernel", 140, 20),  # ends after its range: still step 0's
        _x("gemv", "kernel", 210, 4),
        _x("stray", "kernel", 170, 3),  # between ranges: nobody's
        _x(f"{dt.MARK}9", "cpu_op", 110, 500),  # not an annotation
        dict(ph="i", name="gemv", cat="kernel", ts=215),  # not a complete event
    ]
    got = dt.split_steps(events)
    assert got == [dt.StepKernels(2, 25.0, 50.0), dt.StepKernels(1, 4.0, 4.0),
                   dt.StepKernels(0, 0.0, 0.0)]


def test_device_time_declines_without_pytorch_or_cuda():
    why = dt.reason()
    try:
        import torch
    except ImportError:
        assert why is not None and "PyTorch" in why
        return
    assert (why is None) == torch.cuda.is_available()


ARGV = ["--embedded", "tiny", "--batches", "2", "--contexts", "40", "--steps", "3",
        "--warmup", "1", "--mem-gb", "1"]


def test_without_a_device_clock_the_table_has_no_device_columns(tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(dt, "reason", lambda: "needs a CUDA device")
    assert dp.main([*ARGV, "--device-time", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "not measured here (needs a CUDA device)" in out.err
    (cell,) = json.loads((tmp_path / "tiny-float32.json").read_text())["cells"]
    assert not any(k.startswith("device_") for r in cell["modes"].values() for k in r)
    assert "device busy" not in (tmp_path / "tiny-float32.md").read_text()


def test_device_phase_runs_more_waited_steps_per_mode_and_reports_medians(
        tmp_path, capsys, monkeypatch):
    calls: list[int] = []

    def fake_measure(step, n):  # what the profiler would see: steps run, kernels counted
        out = []
        for i in range(n):
            step(i)
            calls.append(i)
            out.append(dt.StepKernels(10 + i, 100.0 * (i + 1), 150.0 * (i + 1)))
        return out

    monkeypatch.setattr(dt, "reason", lambda: None)
    monkeypatch.setattr(dt, "measure", fake_measure)
    assert dp.main([*ARGV, "--device-time", "--out", str(tmp_path)]) == 0
    assert calls == [0, 1, 2] * len(dp.MODES)  # --steps steps for each waited mode
    (cell,) = json.loads((tmp_path / "tiny-float32.json").read_text())["cells"]
    for m in dp.MODES:
        r = cell["modes"][m]
        assert r["device_kernels"] == 11
        assert r["device_busy_ms"] == pytest.approx(0.2)
        assert r["device_span_ms"] == pytest.approx(0.3)
    assert "device_busy_ms" not in cell["modes"]["overlap"]
    md = (tmp_path / "tiny-float32.md").read_text().splitlines()
    assert md[0].endswith("device busy ms | device span ms | kernels |")
    graph = next(line for line in md if "| graph |" in line)
    assert graph.endswith("| 0.20 | 0.30 | 11 |")
    assert all(len(line.split("|")) == len(md[0].split("|")) for line in md[1:])

"""slabserve.loadtest.summary: auto / best forced over many cells, with a 95% interval."""

from __future__ import annotations

import csv
import math

import pytest

from slabserve.loadtest.compare import Interval, geo_interval
from slabserve.loadtest.summary import cell_ratios, main


def test_geo_interval_matches_a_t_interval_of_the_log_ratios():
    iv = geo_interval([0.9, 1.1])
    logs = [math.log(0.9), math.log(1.1)]
    mean = sum(logs) / 2
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs))  # n - 1 = 1
    half = 12.706 * sd / math.sqrt(2)
    assert iv == Interval(pytest.approx(math.sqrt(0.99)), pytest.approx(math.exp(mean - half)),
                          pytest.approx(math.exp(mean + half)), 2)
    assert iv.lo < 0.9 < 1.1 < iv.hi  # two samples: a wide interval
    same = geo_interval([0.97] * 5)
    assert same.mean == pytest.approx(0.97) and same.lo == pytest.approx(0.97)
    many = geo_interval([0.95, 1.05] * 40)  # 80 cells: the normal quantile
    logs = [math.log(0.95), math.log(1.05)] * 40
    mu = sum(logs) / 80
    sd = math.sqrt(sum((x - mu) ** 2 for x in logs) / 79)
    assert math.log(many.hi / many.mean) == pytest.approx(1.96 * sd / math.sqrt(80), rel=1e-9)
    assert "over 80 cells" in many.describe()
    with pytest.raises(ValueError):
        geo_interval([0.0, math.nan])


def _rows(cell, label, values):
    return [{"context": str(cell[0]), "concurrency": str(cell[1]), "label": label,
             "output_tok_s": str(v)} for v in values]


def test_cell_ratios_take_each_labels_median_run():
    rows = (_rows((1024, 8), "auto", [10, 30, 20]) + _rows((1024, 8), "native", [25, 15, 5])
            + _rows((1024, 8), "gather", [12]) + _rows((1024, 8), "mlx_lm", [99])
            + _rows((4096, 1), "auto", [7]) + _rows((4096, 1), "mlx_lm", [3]))
    # auto's median 20, native's 15, gather's 12; the 4k cell has no forced path
    assert cell_ratios(rows) == {(1024, 8): pytest.approx(20 / 15)}


def test_main_reads_results_files(tmp_path, capsys):
    rows = (_rows((1024, 4), "auto", [9.0]) + _rows((1024, 4), "native", [10.0])
            + _rows((4096, 4), "auto", [11.0]) + _rows((4096, 4), "gather", [10.0]))
    d = tmp_path / "run"
    d.mkdir()
    with (d / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main([str(d)]) == 0
    out = capsys.readouterr().out
    assert "ctx 1024 conc 4: auto / best forced 0.900" in out
    assert f"geometric mean {math.sqrt(0.9 * 1.1):.3f} over 2 cells" in out
    empty = tmp_path / "empty.csv"
    empty.write_text("context,concurrency,label,output_tok_s\n")
    assert main([str(empty)]) == 1

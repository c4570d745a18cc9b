"""``slabserve bench structured`` end to end on the tiny model: both modes run, every
constrained output validates, the table and JSON are written."""

from __future__ import annotations

import json

from slabserve.bench import structured


def test_bench_structured_runs_and_validates(tmp_path, capsys):
    rc = structured.main(["--embedded", "tiny", "--batches", "1,2", "--max-tokens", "110",
                          "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "structured.json").read_text())
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["outputs"] == r["batch"] and r["valid"] == r["outputs"]
        assert r["positions"] > 0 and r["free_ms"] > 0 and r["constrained_ms"] > 0
        assert r["mask_ms"] > 0  # the worker computed masks for the constrained steps
    assert "| 2 |" in capsys.readouterr().out
    assert (tmp_path / "structured.md").read_text().startswith("### tiny")

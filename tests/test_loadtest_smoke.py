"""Smoke load test in CI: our real server (``slabserve serve``, selector on auto) and
mlx_lm.server on the tiny embedded model, concurrency 1 and 4, a few requests each, through
the ``slabserve loadtest --compare`` entry point."""

from __future__ import annotations

import csv
import json

import pytest

from slabserve.loadtest.__main__ import main
from slabserve.loadtest.servers import mlx_lm_installed

MAX_TOKENS = 8


@pytest.mark.slow
def test_compare_smoke_ours_and_mlx_lm(tmp_path):
    configs = "auto,mlx_lm" if mlx_lm_installed() else "auto"
    out = tmp_path / "lt"
    rc = main(["--compare", "--embedded", "tiny", "--configs", configs, "--contexts", "96",
               "--concurrency", "1,4", "--max-tokens", str(MAX_TOKENS), "--requests", "4",
               "--warmup", "1", "--timeout", "120", "--out", str(out), "--no-progress"])
    assert rc == 0, (out / "server-auto.log").read_text()[-3000:]
    data = json.loads((out / "results.json").read_text())
    labels = configs.split(",")
    cells = {(r["row"]["label"], r["row"]["concurrency"]) for r in data["runs"]}
    assert cells == {(lab, c) for lab in labels for c in (1, 4)}
    for run in data["runs"]:
        row = run["row"]
        assert row["requests_ok"] == 4 and row["requests_failed"] == 0
        assert row["output_tok_s"] > 0 and row["ttft_p50_ms"] > 0
        # exactly max_tokens per request: ignore_eos (ours) / EOS logit_bias (mlx_lm)
        assert [rec["output_tokens"] for rec in run["records"]] == [MAX_TOKENS] * 4
        assert all(rec["prompt_tokens"] == 96 - MAX_TOKENS for rec in run["records"])
        assert all(rec["cached_tokens"] == 0 for rec in run["records"])
        if row["label"] == "auto":  # our /metrics, read before and after, agrees
            assert run["trace"] is not None and sum(run["trace"]["by_path"].values()) > 0
            assert row["server_generation_tokens"] == 4 * MAX_TOKENS
            assert row["server_prompt_tokens"] == 4 * (96 - MAX_TOKENS)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(cells)
    md = (out / "results.md").read_text()
    assert "| auto | 96 | 4 |" in md
    assert (out / "loadtest_ctx96.png").stat().st_size > 0

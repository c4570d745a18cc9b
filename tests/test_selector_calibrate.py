"""Calibration writes a per-device profile that the selector then follows; the
attention benchmark runs end to end on a tiny grid and writes its three outputs."""

import json

from slabserve import calibrate as calibrate_cmd
from slabserve.attention import calibrate
from slabserve.attention.profile import TIE, load_for_device, profile_path
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import Path, Reason
from slabserve.bench import attention as bench_attention


def test_calibrate_main_writes_profile_the_selector_follows(monkeypatch, tmp_path):
    monkeypatch.setenv("SLABSERVE_CACHE_DIR", str(tmp_path))
    argv = ["--geometry", "8/2/64", "--dtype", "float32", "--batches", "1,2",
            "--contexts", "48", "--layers", "1", "--reps", "1"]
    assert calibrate_cmd.main(argv) == 0
    prof = load_for_device(tmp_path)
    assert {(e.batch, e.ctx, e.slabs) for e in prof.entries} == {
        (1, 48, "1"), (1, 48, "many"), (2, 48, "1"), (2, 48, "many")}
    assert all(e.gather_ms > 0 and e.native_ms > 0 for e in prof.entries)
    # re-measuring one point replaces it and keeps the others
    assert calibrate_cmd.main(argv[:4] + ["--batches", "1", "--contexts", "48", "--slabs", "one",
                                      "--layers", "1", "--reps", "1"]) == 0
    assert len(load_for_device(tmp_path).entries) == 4
    for e in prof.entries:
        q, pool, batch = calibrate.build_case(8, 2, 64, "float32", e.batch, e.ctx,
                                              "one" if e.slabs == "1" else "many")
        d = Selector(profile=prof).decide(q, pool, 0, batch)
        if e.margin > TIE:
            assert (d.path, d.reason) == (Path(e.faster), Reason.PROFILE)
        else:  # a tie within measurement noise is left to the rules
            assert d.reason is Reason.RULE


def test_startup_calibration_installs_profile(monkeypatch, tmp_path):
    from slabserve.kvcache.pool import PoolGeometry

    monkeypatch.setitem(calibrate.SHORT, "contexts", [40])
    monkeypatch.setitem(calibrate.SHORT, "batches", [1])
    sel = Selector()
    geom = PoolGeometry(2, 2, 64, 16, 8)
    prof = calibrate.calibrate_startup(4, geom, tmp_path, sel, log=lambda *_: None)
    assert sel.profile is prof
    assert load_for_device(tmp_path).entries == prof.entries and len(prof.entries) == 2


def test_model_geometry_reads_config():
    assert calibrate_cmd.model_geometry("embedded:tiny", None) == (4, 2, 32, "float32")


def test_bench_attention_writes_markdown_json_png(monkeypatch, tmp_path):
    monkeypatch.setenv("SLABSERVE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--geometries", "8/2/64", "--dtypes", "float32", "--batches", "2",
            "--contexts", "64", "--layers", "2", "--reps", "1", "--contiguous",
            "--decision-steps", "20", "--bandwidth-mb", "8", "--out", str(out)]
    assert bench_attention.main(argv) == 0
    body = json.loads((out / "cpu.json").read_text())
    rows = body["results"]
    assert [(r["cell"]["slabs"], r["choice"]) for r in rows] == [("one", "native"),
                                                                 ("many", "native")]
    assert all(r["native_ms"] > 0 and r["contiguous_ms"] > 0 and r["regret"] >= 1.0
               for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert body["decision_cost"]["decide_us_per_layer_step"] > 0
    assert "| 8/2/64 float32 B2 ctx64 many |" in (out / "cpu.md").read_text()
    assert (out / "cpu.png").stat().st_size > 0
    assert not profile_path(tmp_path / "cache").exists()  # a benchmark writes no profile

"""``slabserve loadtest --compare --one-server``: auto, forced native and forced gather on
one server process, switched through ``/admin/attention-path``.  A smoke test on the tiny
model (one real server subprocess), then the ordering and the hand-off of other
configurations with the server and the load faked."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest

from slabserve.loadtest import oneserver
from slabserve.loadtest.__main__ import main
from slabserve.loadtest.grid import GridSpec
from slabserve.loadtest.metrics import summarize
from slabserve.loadtest.runner import RunResult
from slabserve.loadtest.servers import STANDARD

MAX_TOKENS = 8
FORCED = {"native": "native:env_native", "gather": "gather:env_gather"}


@pytest.mark.slow
def test_one_server_runs_every_path_on_one_process_with_its_own_trace(tmp_path):
    out = tmp_path / "lt"
    rc = main(["--compare", "--one-server", "--embedded", "tiny", "--configs",
               "auto,native,gather", "--contexts", "96", "--concurrency", "2",
               "--max-tokens", str(MAX_TOKENS), "--requests", "2", "--warmup", "1",
               "--rounds", "2", "--timeout", "120", "--out", str(out), "--no-progress"])
    log = out / "server-one-server.log"
    assert rc == 0, log.read_text()[-3000:]
    assert [p.name for p in out.glob("server-*.log")] == [log.name]  # one server started
    data = json.loads((out / "results.json").read_text())
    rows = [run["row"] for run in data["runs"]]
    # interleaved, the order rotated per round
    assert [(r["label"], r["round"]) for r in rows] == [
        ("auto", 0), ("native", 0), ("gather", 0), ("native", 1), ("gather", 1), ("auto", 1)]
    assert len({r["server"] for r in rows}) == 1 and rows[0]["server"].startswith("pid ")
    for run in data["runs"]:
        row, reasons = run["row"], run["trace"]["by_reason"]
        assert row["requests_ok"] == 2 and row["requests_failed"] == 0
        assert [rec["output_tokens"] for rec in run["records"]] == [MAX_TOKENS] * 2
        assert reasons and all(n > 0 for n in reasons.values())
        if row["label"] in FORCED:  # the forced path only, and forced by the switch
            assert list(reasons) == [FORCED[row["label"]]]
        else:  # auto: the rules (or this device's profile), never a forced reason
            assert all(r.split(":")[1] in ("rule", "profile") for r in reasons), reasons
    md = (out / "results.md").read_text()
    assert "one server process" in md and "auto/best forced tok/s" in md
    assert "WARNING" not in md  # compare.path_checks: every forced run ran its path


def _fake_result(label: str, spec) -> RunResult:
    return RunResult(label, spec, summarize([], spec.max_tokens), None, ())


def test_paths_rotate_per_round_and_other_configs_get_their_own_servers(monkeypatch,
                                                                        tmp_path):
    calls: list[tuple] = []

    class FakeServer:
        base_url, identity = "http://fake", "pid 1 port 2"
        cfg = oneserver.shared_server([STANDARD["auto"]])

        def model_id(self):
            return "m"

    @contextmanager
    def managed(cfg, model_dir, log, timeout):
        calls.append(("start", cfg.label, cfg.native, cfg.extra_args))
        yield FakeServer()

    async def run_once(ep, spec, prompts, label, progress):
        calls.append(("run", label, spec.concurrency))
        return _fake_result(label, spec)

    def run_compare(configs, *args):
        calls.append(("separate", [c.label for c in configs], args[-1]))
        return [replace(_fake_result("mlx_lm", spec), round=0) for spec in grid.specs()], {}

    monkeypatch.setattr(oneserver, "ManagedServer", managed)
    monkeypatch.setattr(oneserver, "run_once", run_once)
    monkeypatch.setattr(oneserver, "run_compare", run_compare)
    monkeypatch.setattr(oneserver, "set_path", lambda url, p: calls.append(("switch", p)))
    grid = GridSpec((96,), (1, 4), MAX_TOKENS)
    configs = [replace(STANDARD[lab], extra_args=("--x",)) for lab in
               ("gather", "auto", "native")] + [STANDARD["mlx_lm"]]
    results, skipped = oneserver.run_one_server(configs, tmp_path, grid, {
        (96, 1): ["p"] * 3, (96, 4): ["p"] * 9}, (), tmp_path, 1.0, False, 2)
    assert skipped == {}
    assert calls[0] == ("start", "one-server", None, ("--x", "--admin-endpoints"))
    cell = ["gather", "auto", "native", "auto", "native", "gather"]
    switched = [c for c in calls[1:-1] if c[0] == "switch"]
    # per concurrency level: the unmeasured prime on the first path, then 2 rounds
    assert [c[1] for c in switched] == (["gather"] + cell) * 2
    runs = [c for c in calls if c[0] == "run"]
    assert [c[1] for c in runs[:2]] == ["gather (prime)", "gather"] and len(runs) == 14
    assert calls[-1] == ("separate", ["mlx_lm"], 2)
    assert [(r.label, r.round, r.server) for r in results[:6]] == [
        (lab, i // 3, "pid 1 port 2") for i, lab in enumerate(cell)]
    assert [r.label for r in results[12:]] == ["mlx_lm", "mlx_lm"]


def test_a_refused_switch_skips_the_path_configs(monkeypatch, tmp_path):
    def post(url, json, timeout):
        return httpx.Response(404, json={"error": {"message": "Unknown request URL"}})

    monkeypatch.setattr(oneserver.httpx, "post", post)
    with pytest.raises(RuntimeError, match="404"):
        oneserver.set_path("http://x", "gather")

    @contextmanager
    def managed(cfg, model_dir, log, timeout):
        yield type("S", (), {"base_url": "http://x", "identity": "", "cfg": cfg,
                             "model_id": lambda self: None})()

    monkeypatch.setattr(oneserver, "ManagedServer", managed)
    configs = [STANDARD["auto"], STANDARD["native"]]
    results, skipped = oneserver.run_one_server(
        configs, tmp_path, GridSpec((96,), (1,), MAX_TOKENS), {(96, 1): ["p"] * 2}, (),
        tmp_path, 1.0, False)
    assert results == [] and set(skipped) == {"auto", "native"}
    assert "404" in skipped["auto"]


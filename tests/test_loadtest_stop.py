"""An interrupted load (Ctrl-C, or SIGTERM from ``timeout``) keeps the finished runs: the
grid raises ``Stopped`` with them, the comparison runners add their own and stop their
server, and ``slabserve loadtest`` writes its report from what ran and exits 1."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager

import pytest

from slabserve.loadtest import grid as grid_mod
from slabserve.loadtest import oneserver
from slabserve.loadtest.__main__ import main
from slabserve.loadtest.grid import GridSpec, Stopped, run_compare, run_grid
from slabserve.loadtest.metrics import summarize
from slabserve.loadtest.runner import RunResult
from slabserve.loadtest.servers import STANDARD

GRID = GridSpec((96,), (1, 2, 4), 8)
PROMPTS = {(96, c): ["p"] * 4 for c in (1, 2, 4)}


def _result(label, spec):
    return RunResult(label, spec, summarize([], spec.max_tokens), None, ())


def _load_until(n_ok, calls, how="interrupt"):
    """A fake ``run_once``: ``n_ok`` runs finish, then the next is interrupted."""

    async def run_once(ep, spec, prompts, label, progress):
        calls.append(label)
        if len(calls) > n_ok:
            if how == "sigterm":  # the real signal, through the handler loadtest installs
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return _result(label, spec)

    return run_once


def test_run_grid_keeps_the_finished_runs(monkeypatch):
    calls: list = []
    monkeypatch.setattr(grid_mod, "run_once", _load_until(2, calls))
    with pytest.raises(Stopped) as st:
        run_grid(None, GRID, PROMPTS, "x", False)
    assert [r.spec.concurrency for r in st.value.results] == [1, 2]
    assert st.value.skipped == {} and len(calls) == 3


@contextmanager
def _server(events):
    @contextmanager
    def managed(cfg, model_dir, log, timeout):
        events.append(("start", cfg.label))
        try:
            yield type("S", (), {"base_url": "http://x", "identity": f"pid {len(events)}",
                                 "cfg": cfg, "model_id": lambda self: "m"})()
        finally:
            events.append(("stop", cfg.label))

    yield managed


def test_run_compare_tags_and_keeps_runs_of_the_interrupted_server(monkeypatch, tmp_path):
    events: list = []
    calls: list = []
    monkeypatch.setattr(grid_mod, "run_once", _load_until(4, calls))
    with _server(events) as managed:
        monkeypatch.setattr(grid_mod, "ManagedServer", managed)
        with pytest.raises(Stopped) as st:
            run_compare([STANDARD["auto"], STANDARD["native"]], tmp_path, GRID, PROMPTS, (),
                        tmp_path, 1.0, False, 2)
    got = [(r.label, r.round, r.spec.concurrency) for r in st.value.results]
    assert got == [("auto", 0, 1), ("auto", 0, 2), ("auto", 0, 4), ("native", 0, 1)]
    assert {r.server for r in st.value.results[3:]} == {"pid 3"}
    assert events == [("start", "auto"), ("stop", "auto"), ("start", "native"),
                      ("stop", "native")]  # the interrupted server was stopped


def test_run_one_server_keeps_its_runs_and_the_separate_servers(monkeypatch, tmp_path):
    events: list = []
    calls: list = []
    monkeypatch.setattr(oneserver, "set_path", lambda url, p: None)
    monkeypatch.setattr(oneserver, "run_once", _load_until(100, calls))
    # the one server finishes (3 cells x (prime + 3 paths)); mlx_lm's server is cut short
    monkeypatch.setattr(grid_mod, "run_once", _load_until(1, []))
    with _server(events) as managed:
        monkeypatch.setattr(oneserver, "ManagedServer", managed)
        monkeypatch.setattr(grid_mod, "ManagedServer", managed)
        monkeypatch.setattr("slabserve.loadtest.servers.mlx_lm_installed", lambda: True)
        configs = [STANDARD["auto"], STANDARD["native"], STANDARD["gather"],
                   STANDARD["mlx_lm"]]
        with pytest.raises(Stopped) as st:
            oneserver.run_one_server(configs, tmp_path, GRID, PROMPTS, (), tmp_path, 1.0,
                                     False)
    labels = [r.label for r in st.value.results]
    assert labels.count("auto") == 3 and labels[-1] == "mlx_lm" and len(labels) == 10
    assert ("stop", "mlx_lm") in events


def test_sigterm_writes_the_report_of_the_finished_runs(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(grid_mod, "run_once", _load_until(2, calls, how="sigterm"))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "lt"
    rc = main(["--url", "http://127.0.0.1:9", "--contexts", "96", "--concurrency", "1,2,4",
               "--requests", "1", "--out", str(out), "--no-progress"])
    assert rc == 1 and len(calls) == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    md = (out / "results.md").read_text()
    assert "**Stopped early**: interrupted after 2 finished runs" in md
    data = json.loads((out / "results.json").read_text())
    assert [run["row"]["concurrency"] for run in data["runs"]] == [1, 2]
    assert data["meta"]["stopped_early"].startswith("interrupted after 2")

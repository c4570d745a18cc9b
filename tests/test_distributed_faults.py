"""Faults and ends of a two-rank server under ``mlx.launch -n 2 --backend ring``: a killed
or hung rank ends the server (a CRITICAL line, rank 0 exits 3) instead of hanging, and
SIGTERM to the launcher drains the in-flight request and ends every rank.  Tensor parallel
throughout; pipeline parallel (``--pipeline``) for a rank killed mid-stream and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
from dist_launch import Server, alive, wait_gone
from models import make

pytestmark = pytest.mark.slow
FLAGS = ("--distributed-timeout", "8", "--shutdown-timeout", "60")


def _stream(url: str, max_tokens: int, events: list, first: threading.Event) -> None:
    """Stream one completion into ``events`` (the data lines); ``first`` once one came."""
    body = {"prompt": "Once", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first.set()
    except httpx.HTTPError as e:  # the server went away mid-stream
        events.append(f"error: {e!r}")
    finally:
        first.set()


def _start_stream(url: str, max_tokens: int) -> tuple[threading.Thread, list]:
    events: list[str] = []
    first = threading.Event()
    t = threading.Thread(target=_stream, args=(url, max_tokens, events, first), daemon=True)
    t.start()
    assert first.wait(120) and events and events[0].startswith("{"), events
    return t, events


@pytest.mark.parametrize(("when", "mode"), [("idle", ()), ("mid-stream", ()),
                                            ("mid-stream", ("--pipeline",))],
                         ids=["idle", "mid-stream", "mid-stream-pipeline"])
def test_killed_rank_ends_the_server(model_root, when, mode):
    with Server(make(model_root, "llama-gqa"), *FLAGS, *mode) as srv:
        srv.wait_healthy()
        pids = srv.rank_pids()
        try:
            stream = _start_stream(srv.url, 1500)[0] if when == "mid-stream" else None
            os.kill(pids[1], signal.SIGKILL)
            srv.proc.wait(180)
            out = srv.output()
            wait_gone(pids.values())
            if stream is not None:
                stream.join(60)
                assert not stream.is_alive()  # cut off or failed, not left hanging
        finally:
            srv.close(pids)
    assert "CRITICAL [rank 0/2] slabserve.distributed: rank 0:" in out, out
    assert "ending this rank with exit status 3" in out
    assert "Node with rank 0 exited with code 3" in out


def test_hung_rank_ends_the_server(model_root):
    with Server(make(model_root, "llama-gqa"), *FLAGS) as srv:
        srv.wait_healthy()
        pids = srv.rank_pids()
        try:
            _start_stream(srv.url, 1500)
            os.kill(pids[1], signal.SIGSTOP)  # alive, holding its sockets, never answering
            out = srv.wait_output("Node with rank 0 exited with code 3")
            os.kill(pids[1], signal.SIGCONT)  # let the launcher's SIGTERM reach it
            srv.proc.wait(180)
            wait_gone(pids.values())
        finally:
            srv.close(pids)
    assert "waited" in out and "on the other ranks (timeout 8s): a rank died or hangs" in out


@pytest.mark.parametrize("mode", [(), ("--pipeline",)], ids=["tensor", "pipeline"])
def test_sigterm_to_the_launcher_drains_and_ends_every_rank(model_root, mode):
    with Server(make(model_root, "llama-gqa"), *FLAGS, *mode) as srv:
        srv.wait_healthy()
        pids = srv.rank_pids()
        try:
            stream, events = _start_stream(srv.url, 64)
            srv.proc.send_signal(signal.SIGTERM)  # the launcher dies at once
            srv.proc.wait(60)
            stream.join(300)
            wait_gone(pids.values())
        finally:
            srv.close(pids)
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"  # drained, not cut off
    assert not any(alive(p) for p in pids.values())

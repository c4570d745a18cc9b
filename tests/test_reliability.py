"""Reliability against real ``slabserve serve`` subprocesses on loopback (the tiny model):
a short soak with mixed traffic and a KV budget that forces preemption, overload against
a queue limit of 32, and SIGTERM while streams are in flight.

The soak's full run (minutes, by hand) and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from slabserve.reliability import soak
from slabserve.reliability.observe import wait_idle
from slabserve.reliability.overload import overload
from slabserve.reliability.process import ServerOptions, ServerProcess
from slabserve.reliability.report import MIB
from slabserve.reliability.shutdown import sigterm_under_load

VALID = {"chat", "chat_stream", "completion", "completion_stream", "near_limit",
         "disconnect_stream", "disconnect_wait"}


def test_short_soak(tmp_path):
    """~30 s of mixed traffic: every check of ``SoakReport.violations`` holds, and the
    run really exercised preemption, disconnects and invalid input."""
    cfg = soak.SoakConfig(duration_s=25.0, warmup_s=4.0, concurrency=5, seed=1,
                          request_timeout_s=60.0, rss_growth_limit_bytes=128 * MIB)
    report = soak.run(ServerOptions(), cfg, tmp_path / "slabserve.server.log")
    print(report.to_markdown())
    assert report.violations() == []
    s = report.summary()
    assert s["preemptions"] > 0, "the KV budget did not force any preemption"
    assert s["disconnects"] > 0 and s["invalid"] > 0
    assert {o.scenario for o in report.outcomes if o.valid} >= VALID
    assert s["leaked_blocks"] == 0 and s["exit_code"] == 0


@pytest.fixture(scope="module")
def queue32(tmp_path_factory):
    """A server admitting at most 32 queued requests (8 running)."""
    opts = ServerOptions(max_context=256, kv_budget_bytes=8 << 20, slab_tokens=512,
                         max_running=8, max_queued=32)
    with ServerProcess(opts, tmp_path_factory.mktemp("overload") / "slabserve.server.log") as srv:
        yield srv


def test_overload_refuses_excess_with_retry_after(queue32):
    """200 simultaneous requests: the excess gets 429 + Retry-After at once, every
    admitted one is served to its end, and with retries every request is served."""
    res = asyncio.run(overload(queue32.url, requests=200, max_tokens=8, retries=30))
    s = res.summary()
    print(s)
    assert len(res.first) == 200 and s["other"] == [], s
    assert s["refused_429"] > 0, "no request was refused: the queue limit did not bite"
    assert s["admitted"] >= 32, s
    assert all(o.retry_after is not None and int(o.retry_after) >= 0 for o in res.refused)
    assert all(o.result == "completed" for o in res.admitted)
    assert s["served_in_the_end"] == 200, s


def test_overload_leaves_server_idle(queue32):
    async def state():
        async with httpx.AsyncClient() as client:
            return await wait_idle(client, queue32.url, 30.0)

    st = asyncio.run(state())
    assert st.idle and st.server_5xx == 0, st
    assert "Traceback" not in queue32.log_text(), queue32.log_tail(60)


def test_sigterm_under_load_ends_every_stream_and_exits_0(tmp_path):
    """SIGTERM with 6 long streams and 2 non-streaming requests in flight and a 2 s
    shutdown timeout: each stream ends with a final chunk (finish_reason, then [DONE])
    or an error event, each plain request with a whole answer or an error object, and
    the process exits 0 within the shutdown timeout plus a margin."""
    opts = ServerOptions(max_context=512, kv_budget_bytes=8 << 20, shutdown_timeout_s=2.0)
    with ServerProcess(opts, tmp_path / "slabserve.server.log") as srv:
        res = asyncio.run(sigterm_under_load(srv, streams=6, plain=2, max_tokens=400,
                                             exit_timeout_s=opts.shutdown_timeout_s + 20))
        log = srv.log_text()
    print(res)
    assert res.exit_code == 0, log[-3000:]
    assert res.cut == [], res.cut
    streams = [e for e in res.ends if e.kind == "stream"]
    assert len(streams) == 6
    assert all(e.how in ("final", "error_event") for e in streams)
    assert all(e.finish_reason in ("stop", "length", "abort") for e in streams
               if e.how == "final")
    plain = [e for e in res.ends if e.kind == "plain"]
    assert all(e.how in ("complete", "error_status") for e in plain), plain
    assert all(e.status in (200, 503) for e in plain), plain
    assert res.late_status in (503, None), res.late_status
    assert "Traceback" not in log, log[-3000:]


def test_dropped_non_streaming_request_is_not_a_500(queue32):
    """A client that gives up on a non-streaming request must not produce a 5xx (the soak
    found it: InvalidStateError in server.generation.while_connected, since fixed)."""
    async def drop_one():
        async with httpx.AsyncClient() as client:
            body = {"prompt": "go", "max_tokens": 200, "ignore_eos": True}
            with pytest.raises(httpx.TimeoutException):
                await client.post(queue32.url + "/v1/completions", json=body, timeout=0.3)
            return await wait_idle(client, queue32.url, 30.0)

    st = asyncio.run(drop_one())
    assert st.idle, st
    assert st.server_5xx == 0, "a dropped request was counted as a 5xx"


def test_sigterm_lets_in_flight_requests_finish_within_the_timeout(tmp_path):
    """With a shutdown timeout longer than the work left, SIGTERM drains: in-flight
    streams and plain requests finish normally (``length``), then the process exits 0."""
    opts = ServerOptions(max_context=256, kv_budget_bytes=8 << 20, shutdown_timeout_s=60.0)
    with ServerProcess(opts, tmp_path / "slabserve.server.log") as srv:
        res = asyncio.run(sigterm_under_load(srv, streams=4, plain=2, max_tokens=48,
                                             exit_timeout_s=90.0))
        log = srv.log_text()
    assert res.exit_code == 0, log[-3000:]
    assert [(e.how, e.finish_reason) for e in res.ends] == \
        [("final", "length")] * 4 + [("complete", "length")] * 2, res.ends
    assert res.late_status in (503, None), res.late_status

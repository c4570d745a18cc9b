"""The load loop against an in-process fake OpenAI server (httpx.MockTransport): request
bodies, concurrency bound, warm-up exclusion, failure kinds, /metrics deltas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from slabserve.loadtest.client import Endpoint, build_body
from slabserve.loadtest.runner import RunSpec, run_once


class FakeServer:
    """Streams ``max_tokens`` one-character chunks; prompts containing 'FAIL' get a 503;
    counts attention-path decisions (one per token) in /metrics."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.native_calls = 0

    def metrics(self) -> httpx.Response:
        text = ("# TYPE slabserve:attention_path counter\n"
                f'slabserve:attention_path_total{{path="native",reason="auto"}} '
                f"{float(self.native_calls)}\n"
                "# TYPE slabserve:generation_tokens counter\n"
                f"slabserve:generation_tokens_total {float(self.native_calls)}\n")
        return httpx.Response(200, text=text)

    async def stream(self, n: int):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield b": keepalive\n\n"
            for i in range(n):
                await asyncio.sleep(0.002)
                self.native_calls += 1
                fin = "length" if i == n - 1 else None
                chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": fin}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.in_flight -= 1

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return self.metrics()
        body = json.loads(request.content)
        self.bodies.append(body)
        if "FAIL" in body["prompt"]:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, content=self.stream(body["max_tokens"]),
                              headers={"content-type": "text/event-stream"})


def test_bodies_force_output_length_per_server_kind():
    ours = build_body(Endpoint("http://x", "m", "ignore_eos"), "p", 7)
    assert ours["ignore_eos"] is True and ours["model"] == "m" and ours["max_tokens"] == 7
    assert ours["stream"] and ours["stream_options"] == {"include_usage": True}
    mlx = build_body(Endpoint("http://x", None, "logit_bias", (2, 5)), "p", 7)
    assert "model" not in mlx and "ignore_eos" not in mlx
    assert mlx["logit_bias"] == {"2": -100.0, "5": -100.0}
    with pytest.raises(ValueError):
        Endpoint("http://x", None, "logit_bias", ())


def test_run_once_bounds_concurrency_excludes_warmup_and_counts_failures():
    fake = FakeServer()
    prompts = ["warm"] + [f"p{i}" + (" FAIL" if i % 5 == 4 else "") for i in range(12)]
    spec = RunSpec(context=64, concurrency=3, max_tokens=6, requests=10, warmup=1)
    res = asyncio.run(run_once(Endpoint("http://fake"), spec, prompts, "fake", False,
                               transport=httpx.MockTransport(fake)))
    s = res.summary
    assert len(fake.bodies) == 11  # 1 warm-up + 10 measured; prompts 11 and 12 unused
    assert fake.max_in_flight == 3
    assert len(res.records) == 10
    assert s.requests_ok == 8 and s.failures == {"http_503": 2}
    # what the server said is kept, and the report names it once per run and kind
    assert {r.detail for r in res.records if not r.ok} == {'{"error":{"message":"busy"}}'}
    from slabserve.loadtest.report import failure_details
    assert failure_details([res]) == [
        'fake ctx 64 conc 3: 2 x http_503: {"error":{"message":"busy"}}']
    assert s.output_tokens == 48 and s.short_outputs == 0
    assert s.ttft.n == 8 and s.ttft.p50 > 0 and s.itl.n == 8 * 5
    # the warm-up's 6 decisions happened before the first snapshot
    assert res.trace is not None and res.trace.by_path == {"native": 48.0}
    assert res.server_counters == {"generation_tokens": 48.0}


def test_run_once_stops_starting_requests_after_duration():
    fake = FakeServer()
    spec = RunSpec(context=200, concurrency=1, max_tokens=100, requests=50, warmup=0,
                   duration_s=0.01)
    res = asyncio.run(run_once(Endpoint("http://fake"), spec, ["p"] * 50, "fake", False,
                               transport=httpx.MockTransport(fake)))
    # each request streams 100 chunks (>= 0.2 s of sleeps), so only the first one starts
    assert len(res.records) == 1 and res.summary.requests_ok == 1


def test_connect_failure_is_a_failure_kind_not_an_exception():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    spec = RunSpec(context=16, concurrency=2, max_tokens=4, requests=4, warmup=0)
    res = asyncio.run(run_once(Endpoint("http://nowhere", metrics_path=None), spec,
                               ["a"] * 4, "x", False, transport=httpx.MockTransport(refuse)))
    assert res.summary.failures == {"connect": 4} and res.trace is None
    assert {r.detail for r in res.records} == {"refused"}


def test_variants_add_our_servers_with_extra_args():
    import argparse
    from pathlib import Path

    import pytest

    from slabserve.loadtest.__main__ import _configs, parse_variants
    from slabserve.loadtest.grid import GridSpec

    assert parse_variants(["s8k=--max-step-tokens 8256 --max-running 16"], ["auto"]) == [
        ("s8k", ("--max-step-tokens", "8256", "--max-running", "16"))]
    for bad in (["native=--x 1"], ["a=1", "a=2"], ["no-equals"], ["bad label=1"]):
        with pytest.raises(SystemExit):
            parse_variants(bad, ["auto"])
    args = argparse.Namespace(configs="native", server_arg=["--kv-budget", "1G"],
                              variant=["big=--max-step-tokens 9000"])
    grid = GridSpec((128,), (1,), 4, None, 10.0, None, 30.0, 0)
    cfgs = _configs(args, Path("unused"), grid)
    assert [c.label for c in cfgs] == ["native", "big"]
    assert cfgs[0].native is True and cfgs[1].native is None
    assert cfgs[1].extra_args == ("--kv-budget", "1G", "--max-step-tokens", "9000")


def test_compare_only_options_are_refused_in_url_mode(capsys):
    from slabserve.loadtest.__main__ import main

    for extra in (["--rounds", "2"], ["--variant", "x=--max-running 4"], ["--rounds", "0"],
                  ["--one-server"]):
        assert main(["--url", "http://127.0.0.1:9", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("--rounds, --variant and --one-server need --compare") == 3
    assert "--rounds must be >= 1" in err

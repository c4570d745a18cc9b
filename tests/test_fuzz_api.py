"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis, against a real
``slabserve serve`` subprocess: valid and invalid (negative) bodies for every operation.

Must hold for every generated request: no 5xx, an answer within the request timeout (no
hang).  Afterwards the server is idle with every KV block free and still serves.
Bounded: ``MAX_EXAMPLES`` per operation and mode over 7 operations (a few hundred cases).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx
import pytest
import schemathesis

from slabserve.reliability.observe import wait_idle
from slabserve.reliability.process import ServerOptions, ServerProcess

MAX_EXAMPLES = 15
REQUEST_TIMEOUT_S = 30.0
SENT: collections.Counter = collections.Counter()  # (method path, status) -> requests
SECONDS: collections.Counter = collections.Counter()  # method path -> seconds waiting


def app_schema() -> dict:
    """The server's OpenAPI document, built from its routes (the app serves none itself;
    this imports the route modules only, not the engine or MLX)."""
    from fastapi import FastAPI

    from slabserve.server import app, chat, completions

    api = FastAPI(title="slabserve", version="0")
    for router in (app.router, completions.router, chat.router):
        api.include_router(router)
    return api.openapi()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    opts = ServerOptions(max_context=48, kv_budget_bytes=4 << 20, slab_tokens=512,
                         max_running=8, max_queued=64, extra_args=("--max-n", "2"))
    with ServerProcess(opts, tmp_path_factory.mktemp("fuzz") / "slabserve.server.log") as srv:
        yield srv


# Built at import from the routes (base URL given per call: the server starts later).
schema = schemathesis.openapi.from_dict(app_schema(), config=schemathesis.Config.from_dict({
    "request-timeout": REQUEST_TIMEOUT_S,
    "seed": 6,
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
    "phases": {"stateful": {"enabled": False}},
}))


@schema.parametrize()
def test_no_5xx_no_hang(case, fuzz_server):
    t0 = time.perf_counter()
    response = case.call(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT_S)
    SENT[f"{case.method} {case.path}", response.status_code] += 1
    SECONDS[f"{case.method} {case.path}"] += time.perf_counter() - t0
    assert response.status_code < 500, (case.method, case.path, json.dumps(case.body),
                                        response.text)
    if response.status_code == 200 and case.body is not None and isinstance(case.body, dict):
        if not case.body.get("stream"):
            body = response.json()
            assert body.get("choices") or body.get("data") is not None, body


def test_after_fuzzing_idle_and_serving(fuzz_server):
    """Runs after the fuzz cases (same module server): nothing left running or held."""
    async def check():
        async with httpx.AsyncClient(timeout=30) as client:
            state = await wait_idle(client, fuzz_server.url, 30.0)
            r = await client.post(fuzz_server.url + "/v1/completions",
                                  json={"prompt": "still here", "max_tokens": 3})
            return state, r

    state, r = asyncio.run(check())
    print(f"{sum(SENT.values())} requests", sorted(SENT.items()), SECONDS.most_common(3))
    assert sum(SENT.values()) >= 200, "the fuzzer sent fewer cases than intended"
    assert state.idle, state
    assert state.server_5xx == 0
    assert "Traceback" not in fuzz_server.log_text(), fuzz_server.log_tail(80)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_fuzz_finds_stay_fixed(fuzz_server):
    """What the fuzzer found once (reported, fixed in server/): float32 underflow of
    ``repetition_penalty`` (then a -inf logprob broke the JSON encoder: 500)."""
    for rp in (1e-300, 5e-324):
        body = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "logprobs": 0,
                "repetition_penalty": rp}
        r = httpx.post(fuzz_server.url + "/v1/completions", json=body, timeout=30)
        assert 400 <= r.status_code < 500, r.text

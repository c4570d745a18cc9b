"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis, against a real
``slabserve serve`` subprocess: valid and invalid (negative) bodies for every operation.

Must hold for every generated request: no 5xx, an answer within the request timeout (no
hang).  Afterwards the server is idle with every KV block free and still serves.
Bounded: ``MAX_EXAMPLES`` per operation and mode over 7 operations (a few hundred cases).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import hypothesis
import pytest
import schemathesis

from reliability.observe import wait_idle
from reliability.process import ServerOptions, ServerProcess

MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 30.0


def app_schema() -> dict:
    """The server's OpenAPI document, built from its routes (the app serves none itself;
    this imports the route modules only, not the engine or MLX)."""
    from fastapi import FastAPI

    from server import app, chat, completions

    api = FastAPI(title="slabserve", version="0")
    for router in (app.router, completions.router, chat.router):
        api.include_router(router)
    return api.openapi()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    opts = ServerOptions(max_context=64, kv_budget_bytes=4 << 20, slab_tokens=512,
                         max_running=8, max_queued=64, extra_args=("--max-n", "2"))
    with ServerProcess(opts, tmp_path_factory.mktemp("fuzz") / "server.log") as srv:
        yield srv


# Built at import from the routes (base URL given per call: the server starts later).
schema = schemathesis.openapi.from_dict(app_schema(), config=schemathesis.Config.from_dict({
    "request-timeout": REQUEST_TIMEOUT_S,
    "seed": 6,
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
    "phases": {"stateful": {"enabled": False}},
}))


def known_bug(body: object) -> str | None:
    """Inputs that hit a reported, not yet fixed bug (each has a strict xfail below, so
    the filter goes once the fix lands)."""
    if isinstance(body, dict):
        rp = body.get("repetition_penalty")
        if isinstance(rp, (int, float)) and not isinstance(rp, bool) and 0 < rp < 1e-30:
            return "repetition_penalty below float32 range -> 500"
    return None


@schema.parametrize()
def test_no_5xx_no_hang(case, fuzz_server):
    hypothesis.assume(known_bug(case.body) is None)
    response = case.call(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT_S)
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
    assert state.idle, state
    assert state.server_5xx == 0
    assert "Traceback" not in fuzz_server.log_text(), fuzz_server.log_tail(80)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.xfail(strict=True, reason="bug: repetition_penalty=1e-300 passes validation "
                   "(> 0) but underflows in float32, the logprob is inf and the JSON "
                   "encoder fails: 500 instead of 400 or a normal answer")
def test_tiny_repetition_penalty_is_not_a_500(fuzz_server):
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "logprobs": 0,
            "repetition_penalty": 1e-300}
    assert known_bug(body) is not None
    r = httpx.post(fuzz_server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code < 500, r.text

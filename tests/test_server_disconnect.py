"""Clients that go away mid-request: their engine requests are aborted and every KV
block comes back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_fixtures import serve, tiny_engine

GEN = {"max_tokens": 2000, "ignore_eos": True}
LONG = {"prompt": "a long story", **GEN}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def srv():
    with serve(tiny_engine()) as s:
        yield s


async def drop_midway(client: httpx.AsyncClient, path: str, body: dict) -> int:
    """Stream ``body``, read three content chunks, then hang up; returns the chunks seen."""
    seen = 0
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                assert '"finish_reason":null' in line  # still generating
                seen += 1
                if seen == 3:
                    break
    return seen


async def test_twenty_dropped_streams_free_every_block(srv):
    engine = srv.ctx.serving
    chat = {"messages": [{"role": "user", "content": "go on"}], **GEN}
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        jobs = [drop_midway(client, "/v1/completions", LONG) for _ in range(10)]
        jobs += [drop_midway(client, "/v1/chat/completions", chat) for _ in range(10)]
        assert await asyncio.gather(*jobs) == [3] * 20
    await asyncio.to_thread(wait_idle, engine)
    assert engine.stats().kv_blocks_used == 0
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        text = (await client.get("/metrics")).text
        assert metric(text, "slabserve:kv_blocks_used") == 0
        assert metric(text, "slabserve:num_requests_running") == 0
        assert metric(text, "slabserve:request_success_total", finished_reason="abort") >= 20
        generated = metric(text, "slabserve:generation_tokens_total")
        assert 60 <= generated < 20 * 2000  # every stream ran, none ran to the end
        r = await client.post("/v1/completions", json={"prompt": "after", "max_tokens": 3})
        assert r.status_code == 200


def test_dropped_non_streaming_request_is_aborted(srv):
    engine = srv.ctx.serving
    before = engine.stats().generated_tokens
    with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(60, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={**LONG, "max_tokens": 4000})
    wait_idle(engine)
    assert engine.stats().generated_tokens - before < 4000
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "slabserve:request_errors_total", status="500") == 0

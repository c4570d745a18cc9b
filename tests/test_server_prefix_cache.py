"""Prefix caching over HTTP: OpenAI's ``usage.prompt_tokens_details.cached_tokens`` in
responses and the last streamed usage chunk, vLLM's prefix-cache metrics, ``cache_salt``,
the KV capacity at /health, and the device-sized pool's arithmetic."""

from __future__ import annotations

import json

import pytest
from server_fixtures import serve, tiny_engine

from slabserve import mlxmem

SYSTEM = "You are a careful assistant. " * 12  # ~330 bytes: 20 full blocks of 16 tokens


@pytest.fixture(scope="module")
def srv():
    with serve(tiny_engine()) as s:
        yield s


def _chat(http, user: str, **extra) -> dict:
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("slabserve:" + name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_second_turn_reports_cached_tokens_and_metrics_count_them(http):
    hits0 = _metric(http, "prefix_cache_hits_total")
    first = _chat(http, "first question")
    again = _chat(http, "another question")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 * 20 and cached % 16 == 0
    assert cached < again["usage"]["prompt_tokens"]
    assert _metric(http, "prefix_cache_hits_total") - hits0 == cached
    assert _metric(http, "prefix_cache_queries_total") >= 2 * first["usage"]["prompt_tokens"]
    assert _metric(http, "prefix_cache_blocks") >= 20


def test_salt_keeps_tenants_apart(http):
    _chat(http, "salted", cache_salt="tenant-a")
    other = _chat(http, "salted", cache_salt="tenant-b")
    same = _chat(http, "salted", cache_salt="tenant-a")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_streamed_usage_has_cached_tokens(http):
    _chat(http, "stream me")
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "stream me"}],
            "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_health_shows_kv_capacity(http, srv):
    health = http.get("/health").json()
    stats = srv.ctx.serving.stats()
    assert health["kv_capacity_tokens"] == stats.kv_blocks_total * 16 > 0
    assert health["kv_dtype"] == "float32"  # the tiny model's K/V dtype
    info = [line for line in http.get("/metrics").text.splitlines()
            if line.startswith("slabserve:cache_config_info{")]
    assert len(info) == 1 and 'cache_dtype="float32"' in info[0] and 'block_size="16"' in info[0]
    assert f'num_gpu_blocks="{stats.kv_blocks_total}"' in info[0]


def test_device_sized_budget(monkeypatch):
    """vLLM's rule: the fraction of device memory less weights and activations; None on
    the CPU, so the caller keeps its bounded default."""
    monkeypatch.setattr(mlxmem, "device_memory_bytes", lambda: 80 << 30)
    assert mlxmem.device_kv_budget(0.9, 3 << 30, 5 << 30) == int((80 << 30) * 0.9) - (8 << 30)
    assert mlxmem.device_kv_budget(0.1, 3 << 30, 5 << 30) == 0
    with pytest.raises(ValueError):
        mlxmem.device_kv_budget(0.0, 0, 0)
    monkeypatch.setattr(mlxmem, "device_memory_bytes", lambda: None)
    assert mlxmem.device_kv_budget(0.9, 0, 0) is None
    reserve = mlxmem.activation_reserve_bytes(16448, 2048, 8192, 4)
    assert 4 << 30 < reserve < 5 << 30  # Llama-3.2-1B shape, a GPU step of 16448 tokens

"""``/admin/attention-path`` on the embedded tiny model: off by default (404), behind the
API key, OpenAI-shaped 400s for bad bodies, and a switch that /metrics' path counters
show on the next decode steps (forced gather, forced native, back to auto)."""

from __future__ import annotations

import httpx
import pytest
from server_fixtures import serve, tiny_engine

from slabserve.loadtest.traces import parse_prometheus, path_delta

KEY = "admin-test-key"
URL = "/admin/attention-path"


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_admin_routes_are_off_by_default():
    with serve(tiny_engine()) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert_error(http.get(URL), 404, "unknown_url")
        assert_error(http.post(URL, json={"path": "gather"}), 404, "unknown_url")
        assert srv.ctx.serving.attention_path() == "auto"  # nothing was switched


@pytest.fixture(scope="module")
def http():
    with serve(tiny_engine(), api_key=KEY, admin_endpoints=True) as srv, \
            httpx.Client(base_url=srv.url, timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_admin_needs_the_api_key(http):
    bare = {"Authorization": ""}
    assert_error(http.get(URL, headers=bare), 401, "invalid_api_key")
    assert_error(http.post(URL, json={"path": "gather"}, headers=bare), 401)
    assert http.get(URL).json() == {"path": "auto"}  # refused switches changed nothing


@pytest.mark.parametrize("body", [
    {"path": "fast"}, {}, {"path": None}, {"path": "gather", "extra": 1}, ["gather"],
])
def test_bad_bodies_are_openai_400s(http, body):
    assert_error(http.post(URL, json=body), 400, "invalid_value")
    assert http.get(URL).json() == {"path": "auto"}


def test_body_that_is_not_json_is_a_400(http):
    resp = http.post(URL, content=b"{path", headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(resp, 400)["message"]


def decisions_while_decoding(http) -> dict[str, float]:
    """(path:reason) -> decode layer-steps of one 6-token completion, from /metrics."""
    before = parse_prometheus(http.get("/metrics").text)
    resp = http.post("/v1/completions", json={"prompt": "Switch", "max_tokens": 6,
                                              "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 6
    return path_delta(before, parse_prometheus(http.get("/metrics").text)).by_reason


def switch(http, path: str, previous: str) -> None:
    resp = http.post(URL, json={"path": path})
    assert resp.status_code == 200 and resp.json() == {"previous": previous, "path": path}
    assert http.get(URL).json() == {"path": path}


def test_switching_changes_the_decode_path_metrics_count(http):
    switch(http, "gather", "auto")
    got = decisions_while_decoding(http)
    assert list(got) == ["gather:env_gather"] and got["gather:env_gather"] > 0
    switch(http, "native", "gather")  # native exists on CPU (attention/native_cpu.py)
    got = decisions_while_decoding(http)
    assert list(got) == ["native:env_native"] and got["native:env_native"] > 0
    switch(http, "auto", "native")
    got = decisions_while_decoding(http)
    assert got and all(r.split(":")[1] in ("rule", "profile") for r in got), got

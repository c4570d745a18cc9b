"""Every error class of the API: status, OpenAI error object and type, and the server
serving the next valid request.  Bad input is never a 500."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from server_fixtures import serve, tiny_engine

OK_BODY = {"prompt": "ok", "max_tokens": 2}


# One live engine at a time (see server_fixtures.tiny_engine): servers per test.
@pytest.fixture
def srv():
    with serve(tiny_engine()) as s:
        yield s


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def error_of(resp: httpx.Response, status: int, type_: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["message"]
    assert "Traceback" not in resp.text
    return err


def served(http: httpx.Client, headers: dict | None = None) -> None:
    r = http.post("/v1/completions", json=OK_BODY, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_400_bad_parameter(http, srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "temperature"
    served(http)


def test_400_prompt_longer_than_context(http, srv):
    n = srv.ctx.max_context
    err = error_of(http.post("/v1/completions", json={"prompt": [65] * n}), 400,
                   "invalid_request_error")
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = error_of(http.post("/v1/completions", json={"prompt": [65] * 10, "max_tokens": n}),
                   400, "invalid_request_error")
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    served(http)


BAD_BODIES = [
    (b"{not json", None), (b"[]", None), (b'{"prompt":"x","temperature":NaN}', "temperature"),
    ({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"), ({"prompt": [10**6]}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"), ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias.1"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "repetition_penalty": 1e-300, "logprobs": 0}, "repetition_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"), ({"messages": [{"role": "bot", "content": "x"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     None),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools.0.function"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
     None),
]


def test_bad_input_is_a_400_never_a_500(http):
    for path, cases in (("/v1/completions", BAD_BODIES), ("/v1/chat/completions", BAD_CHATS)):
        for body, param in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = http.post(path, headers={"Content-Type": "application/json"}, **kw)
            err = error_of(r, 400, "invalid_request_error")
            if param is not None:
                assert err["param"] == param, (body, err)
    served(http)


def test_404_unknown_model_and_route(http, srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    err = error_of(http.get("/v1/nothing"), 404, "invalid_request_error")
    assert err["code"] == "unknown_url"
    error_of(http.get("/v1/models/gpt-9"), 404, "invalid_request_error")
    error_of(http.get("/v1/completions"), 405, "invalid_request_error")
    served(http)


@pytest.fixture
def guarded():
    with serve(tiny_engine(), api_key="sekret", max_body_bytes=4096) as s:
        yield s


def test_401_without_the_api_key(guarded):
    auth = {"Authorization": "Bearer sekret"}
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = http.post("/v1/completions", json=OK_BODY, headers=headers)
            assert error_of(r, 401, "invalid_request_error")["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # probes stay open
        served(http, auth)
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sekret", max_retries=0)
    assert good.models.list().data[0].id == "tiny"


def test_413_body_too_large(guarded):
    auth = {"Authorization": "Bearer sekret"}
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "x" * 5000}, headers=auth)
        assert error_of(r, 413, "invalid_request_error")["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit holds on the bytes read
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        r = http.post("/v1/completions", content=chunked(),
                      headers={**auth, "Content-Type": "application/json"})
        assert error_of(r, 413, "invalid_request_error")["code"] == "request_too_large"
        served(http, auth)


LONG = {"prompt": "long", "max_tokens": 4000, "ignore_eos": True, "stream": True}


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_429_queue_full_with_retry_after():
    engine = tiny_engine(max_running=1, max_queued=1)
    with serve(engine, retry_after_s=2) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as running:
            lines = running.iter_lines()  # keep it: dropping the iterator closes the stream
            next(lines)  # running now
            queued: list[int] = []

            def second() -> None:
                with http.stream("POST", "/v1/completions", json=LONG) as r:
                    queued.append(r.status_code)

            t = threading.Thread(target=second)
            t.start()
            wait_for(lambda: engine.stats().waiting == 1)
            r = http.post("/v1/completions", json=OK_BODY)
            assert error_of(r, 429, "rate_limit_error")["code"] == "queue_full"
            assert r.headers["Retry-After"] == "2"
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="x", max_tokens=2)
        t.join(60)  # the first stream was dropped: the queued one ran (and was dropped)
        assert queued == [200]
        wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
        served(http)

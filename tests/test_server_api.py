"""The OpenAI API end to end: a real uvicorn on a loopback port serving the embedded tiny
model, driven by httpx and the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server_fixtures import serve, tiny_engine

from slabserve import env
from slabserve.scheduler.api import Request, SamplingParams

PROMPT = "The slab allocator"


@pytest.fixture(scope="module")
def srv():
    with serve(tiny_engine()) as s:
        yield s


@pytest.fixture(scope="module")
def tok(srv):
    return srv.ctx.codec.tokenizer


def mlx_lm_greedy(ids: list[int], n: int) -> list[int]:
    """Reference: mlx-lm's own greedy decoding of the same model directory."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    from slabserve.engine.loader import resolve_model_path

    model, _ = load(str(resolve_model_path(None, cache_dir=env.cache_dir())))
    return [int(token) for token, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def sse_events(resp: httpx.Response) -> list:
    """Decoded ``data:`` payloads of a finished SSE body (``[DONE]`` as the string)."""
    events = []
    for line in resp.text.split("\n\n"):
        if line.startswith("data: "):
            body = line[len("data: "):]
            events.append(body if body == "[DONE]" else json.loads(body))
    return events


def test_models_health_ready(http, srv):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == srv.ctx.max_context
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["blas"]["backend"] and "blas" in health["blas"]
    assert http.get("/ready").status_code == 200
    assert http.get("/v1/models/tiny").json()["id"] == "tiny"


def engine_direct(srv, ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """(token ids, text) of the engine itself, bypassing HTTP, on the server's loop."""
    async def run() -> tuple[list[int], str]:
        out, text = [], []
        async for d in srv.ctx.serving.generate(Request("direct", tuple(ids), params)):
            out.extend(d.token_ids)
            text.append(d.text)
        return out, "".join(text)

    return srv.call(run())


def test_greedy_completion_equals_engine_and_mlx_lm(client, tok, srv):
    ids = tok.encode(PROMPT)
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    assert isinstance(resp, Completion)
    choice = resp.choices[0]
    ref = mlx_lm_greedy(ids, 12)
    direct_ids, direct_text = engine_direct(
        srv, ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert direct_ids == ref
    assert choice.text == direct_text
    assert choice.model_extra["token_ids"] == ref
    assert choice.model_extra["prompt_token_ids"] == ids
    assert choice.text == tok.decode(ref)
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == len(ids) + 12


def test_streamed_completion_matches_unstreamed(client, tok):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert all(isinstance(c, Completion) for c in chunks)
    body, last = chunks[:-1], chunks[-1]
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] is not None
    assert all("usage" not in e for e in events[:-1])


def test_chat_non_streaming(client, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert isinstance(resp, ChatCompletion)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.model_extra["token_ids"] == mlx_lm_greedy(ids, 8)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 8
    entries = choice.logprobs.content
    assert len(entries) == 8
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy takes the best
        assert bytes(e.bytes).decode("utf-8") == e.token


def test_chat_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=9,
              temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_prompt_forms_n_and_echo(client, tok):
    ids = tok.encode(PROMPT)
    kw = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert client.completions.create(prompt=ids, **kw).choices[0].text == by_text
    resp = client.completions.create(prompt=[ids, tok.encode("other")], n=2, **kw)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text == by_text  # greedy: n copies
    assert resp.usage.prompt_tokens == len(ids) + len(tok.encode("other"))
    assert resp.usage.completion_tokens == 20
    two = client.completions.create(prompt=[PROMPT, "other"], **kw)
    assert two.choices[0].text == by_text and two.choices[1].text == resp.choices[2].text
    echoed = client.completions.create(prompt=PROMPT, echo=True, **kw).choices[0].text
    assert echoed == PROMPT + by_text


def test_stop_strings(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    cut = next(i for i in range(3, len(full)) if full[i].isprintable() and full[i] != "\ufffd")
    stopped = client.completions.create(stop=[full[cut:cut + 1], "never"], **kw).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(full[cut])]


def test_legacy_logprobs(client):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_sampling_fields_are_honoured(client, tok):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
    a = client.completions.create(temperature=1.0, seed=7, top_p=0.9, **kw).choices[0].text
    b = client.completions.create(temperature=1.0, seed=7, top_p=0.9, **kw).choices[0].text
    assert a == b
    x = tok.encode("x")[0]
    forced = client.completions.create(temperature=0, logit_bias={str(x): 100}, **kw)
    assert forced.choices[0].text == "x" * 8
    extras = {"ignore_eos": True, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1}
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, seed=1,
                                     presence_penalty=0.5, frequency_penalty=0.5,
                                     extra_body=extras)
    assert resp.usage.completion_tokens == 4


def test_metrics_after_traffic(http, client):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    text = http.get("/metrics").text
    for name in ("slabserve:num_requests_running", "slabserve:num_requests_waiting",
                 "slabserve:kv_cache_usage_perc", "slabserve:prompt_tokens_total",
                 "slabserve:generation_tokens_total", "slabserve:num_preemptions_total",
                 "slabserve:time_to_first_token_seconds_bucket",
                 "slabserve:inter_token_latency_seconds_bucket",
                 "slabserve:e2e_request_latency_seconds_bucket",
                 'slabserve:request_success_total{finished_reason="length"'):
        assert name in text, name
    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{"))

    assert total("slabserve:generation_tokens_total") > 0
    paths = [line for line in text.splitlines() if line.startswith("slabserve:attention_path")]
    assert paths and all('path="' in p and 'reason="' in p for p in paths)
    assert total("slabserve:attention_path_total") > 0
    steps = total("slabserve:decode_step_seconds_count")  # 3 tokens: at least 2 decode steps
    assert steps >= 2 and total("slabserve:decode_step_seconds_sum") > 0
    phases = [line for line in text.splitlines()
              if line.startswith("slabserve:decode_step_phase_seconds_sum{")]
    assert {line.split('phase="')[1].split('"')[0] for line in phases} == {
        "schedule", "forward", "sample", "wait", "update", "deliver"}
    assert 0 < total("slabserve:decode_step_phase_seconds_sum") == pytest.approx(
        total("slabserve:decode_step_seconds_sum"))
    assert total("slabserve:decode_step_phase_seconds_count") == 6 * steps
    assert 0 < total("slabserve:decode_step_host_cpu_seconds_sum") <= total(
        "slabserve:decode_step_seconds_sum")
    assert 0 <= total("slabserve:decode_steps_ahead_total") <= steps
    # the step histogram: cumulative buckets ending at +Inf with every step
    buckets = [line for line in text.splitlines()
               if line.startswith("slabserve:decode_step_seconds_bucket{")]
    counts = [float(line.rsplit(" ", 1)[1]) for line in buckets]
    assert 'le="+Inf"' in buckets[-1] and counts[-1] == steps
    assert counts == sorted(counts)

"""Structured outputs through the API and the official ``openai`` SDK on the embedded
random-weight model: every constrained output parses and validates (jsonschema) over many
seeds and schemas, with n > 1, streaming, logprobs, stop strings and max_tokens; the
errors are 400s with the reason; the model answers to its aliases."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_fixtures import serve, tiny_engine

SCHEMAS = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "shade": {"type": "string", "enum": ["x", "y"]}},
             "required": ["color", "shade"]},
    "array": {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 500},
               "minItems": 1, "maxItems": 4}},
        "required": ["xs"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                     "maxItems": 2}},
            "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "x": {"type": "number"}, "p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "exclusiveMinimum": 10}},
        "required": ["x", "p", "n"], "additionalProperties": False},
    "strings": {"type": "object", "properties": {
        "short": {"type": "string", "minLength": 2, "maxLength": 6},
        "maybe": {"type": ["string", "null"], "maxLength": 3}},
        "required": ["short", "maybe"], "additionalProperties": False},
}
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]


CLIENT_TIMEOUT = 120


@pytest.fixture(scope="module")
def srv():
    with serve(tiny_engine(), model_aliases=("/models/tiny", "tiny-alias")) as s:
        yield s


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_validates_over_seeds_with_n(client, name):
    for seed in range(4):
        resp = client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format=json_schema_format(name),
            max_tokens=96, seed=seed, n=2)
        for choice in resp.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


class Item(pydantic.BaseModel):
    sku: str = pydantic.Field(max_length=6)
    qty: int = pydantic.Field(ge=1, le=99)


class Order(pydantic.BaseModel):
    id: int
    status: Literal["open", "shipped", "closed"]
    items: list[Item] = pydantic.Field(min_length=1, max_length=3)
    note: str | None = pydantic.Field(max_length=20)


def test_sdk_parse_with_a_pydantic_model(client):
    for seed in range(6):
        resp = client.chat.completions.parse(model="tiny", messages=MESSAGES,
                                             response_format=Order, max_tokens=160, seed=seed)
        msg = resp.choices[0].message
        assert isinstance(msg.parsed, Order), msg.content
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(msg.content), Order.model_json_schema())


def test_json_object_and_seeds_reproduce(client):
    kw = dict(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
              max_tokens=64, seed=11)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert isinstance(json.loads(first), dict)
    assert client.chat.completions.create(**kw).choices[0].message.content == first


def test_streamed_equals_unstreamed_with_logprobs(client):
    kw = dict(model="tiny", messages=MESSAGES, response_format=json_schema_format("nested"),
              max_tokens=96, seed=5, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])
    for entry in whole.logprobs.content:
        assert -9999 < entry.logprob <= 0  # a token the mask allowed: finite


def test_completions_with_response_format_and_vllm_extensions(client):
    schema = SCHEMAS["object"]
    kw = dict(model="tiny", prompt="JSON:", max_tokens=64, seed=3)
    for extra in ({"response_format": json_schema_format("object")},
                  {"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        choice = client.completions.create(extra_body=extra, **kw).choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), schema)
    regex = client.completions.create(
        extra_body={"guided_regex": r"[a-z]{3,12}@example\.com"}, **kw).choices[0].text
    assert regex.endswith("@example.com") and 3 <= len(regex.split("@")[0]) <= 12
    texts = {client.completions.create(
        extra_body={"guided_choice": ["alpha", "beta", "gamma"]}, **{**kw, "seed": s}
    ).choices[0].text for s in range(8)}
    assert texts <= {"alpha", "beta", "gamma"} and texts
    grammar = 'start: "x=" NUM ";"\nNUM: /[0-9]{1,3}/'
    out = client.completions.create(extra_body={"structured_outputs": {"grammar": grammar}},
                                    **kw).choices[0].text
    assert out.startswith("x=") and out.endswith(";") and out[2:-1].isdigit()


def test_max_tokens_truncates_with_length_and_stop_strings_apply(client):
    kw = dict(model="tiny", messages=MESSAGES, response_format=json_schema_format("object"),
              seed=2)
    short = client.chat.completions.create(max_tokens=5, **kw).choices[0]
    assert short.finish_reason == "length" and short.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.message.content)
    stopped = client.chat.completions.create(max_tokens=64, stop=['"age"'], **kw).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content.startswith('{"name":')
    assert '"age"' not in stopped.message.content


def test_constrained_and_free_requests_share_the_batch(srv, client):
    import concurrent.futures as cf

    free = dict(model="tiny", messages=MESSAGES, max_tokens=24, seed=9,
                extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(**free).choices[0].message.content
    with cf.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(client.chat.completions.create, model="tiny", messages=MESSAGES,
                            response_format=json_schema_format("array"), max_tokens=64,
                            seed=s) for s in range(5)]
        mixed = pool.submit(client.chat.completions.create, **free)
        for j in jobs:
            jsonschema.validate(json.loads(j.result().choices[0].message.content),
                                SCHEMAS["array"])
        assert mixed.result().choices[0].message.content == alone


def error_of(resp: httpx.Response, param: str | None) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and "Traceback" not in resp.text
    assert err["param"] == param, err
    return err["message"]


def test_errors_are_400s_with_the_reason(http):
    chat = {"messages": MESSAGES, "max_tokens": 4}
    bad_schema = {"type": "json_schema",
                  "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    assert "no-such-type" in error_of(
        http.post("/v1/chat/completions", json={**chat, "response_format": bad_schema}),
        "response_format")
    assert "unclosed" in error_of(http.post("/v1/completions", json={
        "prompt": "x", "guided_regex": "[a-"}), "guided_regex")
    assert "nothing" in error_of(http.post("/v1/completions", json={
        "prompt": "x", "structured_outputs": {"grammar": "start: nothing"}}),
        "structured_outputs.grammar")
    assert "only one" in error_of(http.post("/v1/completions", json={
        "prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}), "guided_choice")
    error_of(http.post("/v1/completions", json={"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"schema": {}}}}), "response_format.json_schema.name")


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    (b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud83d"]}', "stop"),
    (b'{"prompt": "x", "guided_json": {"\\ud800": {}}}', "guided_json"),
])
def test_lone_surrogates_are_a_400(http, body, param):
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert "surrogate" in error_of(r, param)


def test_lone_surrogate_in_a_chat_message_is_a_400(http):
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = http.post("/v1/chat/completions", content=body,
                  headers={"Content-Type": "application/json"})
    assert "surrogate" in error_of(r, "messages")
    assert http.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2}
                     ).status_code == 200


def test_model_is_accepted_by_its_aliases(client, http):
    for name in ("tiny", "/models/tiny", "tiny-alias"):
        assert client.completions.create(model=name, prompt="x", max_tokens=1).model == "tiny"
    assert http.get("/v1/models/tiny-alias").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="/models/other", prompt="x", max_tokens=1)

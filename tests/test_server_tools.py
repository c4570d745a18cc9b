"""Tool calling through the ``openai`` SDK on the embedded random-weight model (its chat
template renders tools Hermes/Qwen-style): with "required" or a named function every call
parses and its arguments validate against the function's schema, streamed or not; "auto"
parses what the model writes; histories with tool calls and tool results render; the
parsers of each family on known outputs; the errors are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from server_fixtures import serve, tiny_engine

from slabserve.server.chattools import ToolStream
from slabserve.server.toolcalls import ParsedCall, detect_family, family

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 16},
    "filters": {"type": "array", "items": {"enum": ["news", "web", "images"]}, "maxItems": 2}},
    "required": ["query"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "search": SEARCH}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n} tool",
                                           "parameters": s}} for n, s in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


CLIENT_TIMEOUT = 120


@pytest.fixture(scope="module")
def srv():
    with serve(tiny_engine()) as s:
        yield s


def valid_calls(message, names=None) -> list:
    assert message.tool_calls, message.content
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def test_required_calls_always_parse_and_validate(client):
    for seed in range(8):
        resp = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
            max_tokens=160, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        valid_calls(choice.message)


def test_named_function_is_the_one_called_once(client):
    for name in SCHEMAS:
        for seed in range(3):
            resp = client.chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=seed,
                tool_choice={"type": "function", "function": {"name": name}})
            calls = valid_calls(resp.choices[0].message, [name])
            assert len(calls) == 1 and resp.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_gives_one_call_with_n(client):
    resp = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", n=3,
        parallel_tool_calls=False, max_tokens=120, seed=4)
    for choice in resp.choices:
        assert len(valid_calls(choice.message)) == 1


def test_streamed_tool_calls_in_openai_shape(client):
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
              max_tokens=160, seed=3)
    whole = client.chat.completions.create(**kw).choices[0].message
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in valid_calls(streamed)] == \
        [(c.function.name, c.function.arguments) for c in whole.tool_calls]
    raw = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for c in raw if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert deltas and all(d.index is not None and d.id and d.function.name for d in deltas)


def test_auto_and_none(client, srv):
    for seed in range(3):
        choice = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=24,
            seed=seed).choices[0]
        if choice.message.tool_calls:  # a random model rarely calls: whatever it wrote parses
            valid_calls(choice.message)
        else:
            assert choice.finish_reason in ("stop", "length")
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                          tool_choice="none", max_tokens=4, seed=1)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4).usage.prompt_tokens


def test_history_with_tool_calls_and_results(client, srv):
    first = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=120, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = MESSAGES + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    resp = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                          max_tokens=4, extra_body={"return_token_ids": True})
    tok = srv.ctx.codec.tokenizer
    prompt = tok.decode(resp.choices[0].model_extra["prompt_token_ids"])
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt
    assert f'"name": "get_weather", "arguments": {call.function.arguments}' in prompt


def error_of(resp: httpx.Response, param: str | None) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    return err["message"]


def test_tool_errors_are_400s(srv):
    body = {"messages": MESSAGES, "max_tokens": 4}
    no_schema = [{"type": "function", "function": {"name": "ping"}}]
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        post = lambda extra: http.post("/v1/chat/completions", json={**body, **extra})  # noqa: E731
        assert "nope" in error_of(post({"tools": TOOLS, "tool_choice": {
            "type": "function", "function": {"name": "nope"}}}), "tool_choice")
        assert "schema" in error_of(post({"tools": no_schema, "tool_choice": "required"}),
                                    "tools.0.function.parameters")
        assert post({"tools": no_schema, "tool_choice": "auto"}).status_code == 200
        bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "bad"}}}]
        assert "bad" in error_of(post({"tools": bad, "tool_choice": "required"}), "tools")
        error_of(post({"tool_choice": "required"}), "tool_choice")
        error_of(post({"tools": TOOLS + TOOLS[:1]}), "tools")
        error_of(post({"tools": TOOLS, "tool_choice": "required",
                       "response_format": {"type": "json_object"}}), "response_format")
        bad_args = [{"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]
        assert "not JSON" in error_of(post({"messages": MESSAGES + bad_args}), "messages.1")


def test_families_parse_their_formats():
    hermes = family("hermes")
    content, calls = hermes.parse('Let me check.\n<tool_call>\n{"name": "add", "arguments": '
                                  '{"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": '
                                  '"get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert content == "Let me check."
    assert calls == [ParsedCall("add", '{"a": 1, "b": 2}'),
                     ParsedCall("get_weather", '{"city": "Oslo"}')]
    assert hermes.parse("<tool_call>\n{broken\n</tool_call>") == (
        "<tool_call>\n{broken\n</tool_call>", [])
    llama = family("llama3_json")
    assert llama.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                       '{"name": "add", "parameters": {"a": 3, "b": 4}}')[1] == [
        ParsedCall("add", '{"a": 1, "b": 2}'), ParsedCall("add", '{"a": 3, "b": 4}')]
    assert llama.parse("Hello {there}") == ("Hello {there}", [])
    mistral = family("mistral")
    assert mistral.parse('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]') == (
        None, [ParsedCall("add", '{"a": 1, "b": 2}')])
    assert detect_family("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_family("<|start_header_id|>ipython") == "llama3_json"
    assert detect_family("<tool_call>") == detect_family(None) == "hermes"


def test_tool_stream_holds_back_a_possible_call_start():
    stream = ToolStream(family("hermes"))
    assert stream.feed("Sure <tool", False) == ("Sure ", [])
    assert stream.feed('_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', False) == (
        "", [])
    assert stream.feed("\n</tool_call>", True) == ("", [ParsedCall("add", '{"a": 1, "b": 2}')])
    plain = ToolStream(family("hermes"))
    assert plain.feed("a <to", False) == ("a ", [])
    assert plain.feed("y", True) == ("<toy", [])

"""Server paths the tiny model cannot trigger on demand, on a scripted engine: engine
failures (mid-stream and not), refusals of every kind, bugs that must stay a bare 500."""

from __future__ import annotations

import json

import httpx
import pytest
from server_fixtures import LiveServer

from slabserve.scheduler.api import Delta, Request, RequestError, ServingLoop, ServingStats
from slabserve.server.app import create_app
from slabserve.server.config import ServerConfig


class ByteTokenizer:
    """Bytes as tokens (256 = end of text)."""

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"


class ScriptedEngine(ServingLoop):
    """Answers with the prompt's last byte repeated; prompts starting with a command
    byte misbehave: ``!`` fails after two tokens, ``%`` raises after one, ``?`` is refused
    with the kind named by the rest of the prompt, ``#`` raises a bug."""

    model_name = "scripted"
    max_context = 64

    def __init__(self) -> None:
        self.tokenizer = ByteTokenizer()
        self.aborted: list[str] = []

    async def start(self) -> None: ...

    async def shutdown(self, timeout: float) -> None: ...

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> ServingStats:
        return ServingStats(0, 0, 0, 1, 0, 0, 0)

    def generate(self, request: Request):
        head = bytes(request.prompt_tokens[:1]).decode()
        if head == "?":
            raise RequestError(bytes(request.prompt_tokens[1:]).decode(), "refused")
        if head == "#":
            raise KeyError("a bug")
        return self._stream(request, head)

    async def _stream(self, request: Request, head: str):
        tok = request.prompt_tokens[-1]
        for i in range(request.params.max_tokens):
            if head == "!" and i == 2:
                yield Delta((), "", finish_reason="error", error="step failed")
                return
            if head == "%" and i == 1:
                raise RuntimeError("broken iterator")
            last = i == request.params.max_tokens - 1
            yield Delta((tok,), chr(tok), finish_reason="length" if last else None)


@pytest.fixture(scope="module")
def http():
    with LiveServer(create_app(ScriptedEngine(), ServerConfig())) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def served(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "bbb"


def test_engine_failure_mid_stream_is_an_error_event(http):
    r = http.post("/v1/completions", json={"prompt": "!x", "max_tokens": 5, "stream": True})
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "step failed"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-2]] == ["x", "x"]
    served(http)


def test_engine_failure_without_stream_is_a_500_with_message(http):
    r = http.post("/v1/completions", json={"prompt": "!x", "max_tokens": 5})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "step failed", "type": "server_error",
                                 "param": None, "code": "engine_error"}
    served(http)


def test_engine_iterator_raising_ends_its_choice_with_an_error(http):
    r = http.post("/v1/completions", json={"prompt": "%y", "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert '"message":"the serving loop failed"' in r.text and "broken iterator" not in r.text
    r = http.post("/v1/completions", json={"prompt": "%y", "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["message"] == "the serving loop failed"
    served(http)


@pytest.mark.parametrize("kind,status,type_", [
    ("queue_full", 429, "rate_limit_error"), ("too_long", 400, "invalid_request_error"),
    ("invalid", 400, "invalid_request_error"), ("kv_capacity", 400, "invalid_request_error"),
    ("shutting_down", 503, "service_unavailable_error")])
def test_engine_refusals_map_to_statuses(http, kind, status, type_):
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": "?" + kind, "stream": stream})
        assert r.status_code == status and r.json()["error"]["type"] == type_
    served(http)


def test_a_bug_is_a_bare_500(http):
    r = http.post("/v1/completions", json={"prompt": "#boom"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "KeyError" not in r.text and "Traceback" not in r.text
    served(http)


def test_n_choices_stream_and_finish_each(http):
    r = http.post("/v1/completions", json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3,
                                           "stream": True})
    chunks = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n")
              if e.startswith("data: {")]
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "bbb", 1: "bbb", 2: "ddd", 3: "ddd"}
    assert finishes == dict.fromkeys(range(4), "length")


def test_cli_flags_become_frozen_configs(monkeypatch, capsys):
    from slabserve import serve as cli

    monkeypatch.setenv("SLABSERVE_API_KEY", "from-env")
    monkeypatch.setenv("SLABSERVE_MLX_CACHE_LIMIT", "3G")
    args = cli.parser().parse_args([
        "--port", "0", "--kv-budget", "256M", "--block-size", "32", "--max-running", "4",
        "--max-queued", "8", "--shutdown-timeout", "2.5", "--max-body-bytes", "64k",
        "--prefill-kv-bucket", "1024", "--dispatch-every", "6"])
    server, engine = cli.configs(args)
    assert (server.host, server.port, server.api_key) == ("127.0.0.1", 0, "from-env")
    assert server.max_body_bytes == 64 << 10 and server.shutdown_timeout == 2.5
    assert engine.model is None and engine.cache.kv_budget_bytes == 256 << 20
    assert engine.cache.block_size == 32 and engine.scheduler.max_running == 4
    assert engine.scheduler.max_queued == 8 and engine.runner.prefill_kv_bucket == 1024
    assert engine.runner.dispatch_every == 6
    assert engine.mlx_cache_limit_bytes == 3 << 30  # applied by build_serving
    flag = cli.configs(cli.parser().parse_args(["--cache-limit", "1G"]))[1]
    assert flag.mlx_cache_limit_bytes == 1 << 30  # the flag wins
    with pytest.raises(AttributeError):
        server.port = 1  # frozen
    assert cli.main(["--block-size", "3"]) == 2  # invalid: refused before loading anything
    assert "block_size" in capsys.readouterr().err


def test_logprobs_stay_valid_json_when_the_distribution_degenerates():
    from slabserve.scheduler.api import TokenLogprob
    from slabserve.server.chat import chat_logprobs
    from slabserve.server.codec import MIN_LOGPROB, TextCodec
    from slabserve.server.completions import legacy_logprobs

    codec = TextCodec(ByteTokenizer())
    lps = [TokenLogprob(97, float("-inf"), ((97, float("nan")), (98, 1e-9)))]
    legacy = legacy_logprobs(codec, lps, 0)
    assert legacy["token_logprobs"] == [MIN_LOGPROB]
    assert legacy["top_logprobs"] == [{"a": MIN_LOGPROB, "b": 0.0}]
    chat = chat_logprobs(codec, lps)["content"][0]
    assert chat["logprob"] == MIN_LOGPROB
    assert [t["logprob"] for t in chat["top_logprobs"]] == [MIN_LOGPROB, 0.0]
    json.dumps([legacy, chat], allow_nan=False)  # strict JSON: raises on inf/nan

"""Invalid requests the soak mixes in.  Each must be answered with a 4xx (never a 5xx, a
2xx or a hang): malformed and non-object JSON, wrong types, out-of-range sampling values,
unknown fields, prompts over the context limit, token ids outside the vocabulary, empty
or malformed chat messages, an unknown model, route or method, invalid UTF-8, deeply
nested JSON and a body over the size limit.  ``partial_body`` is a client that sends the
headers and part of the body, then hangs up."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from slabserve.reliability.traffic import Outcome, Target, token_prompt

OUT_OF_RANGE = (
    {"temperature": 5.0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5},
    {"max_tokens": 0}, {"max_tokens": -3}, {"n": 0}, {"logprobs": 50},
    {"presence_penalty": 3.0}, {"frequency_penalty": -9.0}, {"top_k": -7}, {"min_p": 2.0},
    {"repetition_penalty": 0.0}, {"n": 10_000}, {"logit_bias": {"1": 500}},
    {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"seed": "x"},
)


@dataclass(frozen=True)
class BadRequest:
    """One invalid HTTP request: ``json`` body, or raw ``content`` bytes sent as JSON."""

    name: str
    method: str
    path: str
    json: object = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def _completion(t: Target, **fields: object) -> dict:
    return {"model": t.model, "prompt": "hello", "max_tokens": 4, **fields}


def cases(t: Target, rng: random.Random) -> list[BadRequest]:
    """Every kind of invalid request, with randomised details."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    over = t.max_context + rng.randint(0, 64)
    return [
        BadRequest("malformed_json", "POST", c, content=b'{"model": "x", "prompt": "a"'),
        BadRequest("not_an_object", "POST", c, json=[1, 2, 3]),
        BadRequest("empty_body", "POST", chat, content=b""),
        BadRequest("wrong_type", "POST", c, json=_completion(t, max_tokens="ten")),
        BadRequest("out_of_range", "POST", rng.choice((c, chat)),
                   json=_completion(t, **rng.choice(OUT_OF_RANGE))),
        BadRequest("unknown_field", "POST", c, json=_completion(t, frobnicate=1)),
        BadRequest("prompt_too_long", "POST", c,
                   json=_completion(t, prompt=token_prompt(rng, over))),
        BadRequest("prompt_plus_max_tokens_too_long", "POST", c,
                   json=_completion(t, prompt=token_prompt(rng, 8), max_tokens=t.max_context)),
        BadRequest("token_id_out_of_vocab", "POST", c,
                   json=_completion(t, prompt=[1, 2, rng.choice((10**9, 2**31, -1))])),
        BadRequest("empty_messages", "POST", chat, json={"model": t.model, "messages": []}),
        BadRequest("bad_role", "POST", chat,
                   json={"model": t.model, "messages": [{"role": "robot", "content": "x"}]}),
        BadRequest("unknown_model", "POST", c, json=_completion(t, model="no-such-model")),
        BadRequest("unknown_route", "POST", "/v1/nothing", json={}),
        BadRequest("wrong_method", "GET", c),
        BadRequest("invalid_utf8", "POST", c, content=b'{"prompt": "\xff\xfe\xfa"}'),
        BadRequest("deep_nesting", "POST", c, content=b'{"prompt": ' + b"[" * 100_000),
        BadRequest("stream_options_without_stream", "POST", c,
                   json=_completion(t, stream_options={"include_usage": True})),
        BadRequest("body_too_large", "POST", c, content=b'{"prompt": "'
                   + b"a" * (t.max_body_bytes + 1024) + b'"}'),
    ]


async def send(client: httpx.AsyncClient, t: Target, bad: BadRequest) -> Outcome:
    """Send ``bad``; ``rejected`` when answered with a 4xx other than 429."""
    t0 = time.perf_counter()
    try:
        r = await client.request(bad.method, t.url + bad.path, json=bad.json,
                                 content=bad.content, headers=bad.headers)
    except httpx.HTTPError as e:
        return Outcome(bad.name, False, "failed", None, f"{type(e).__name__}: {e}",
                       time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    ok = 400 <= r.status_code < 500 and r.status_code != 429
    detail = "" if ok else f"{bad.method} {bad.path}: {r.text[:200]}"
    return Outcome(bad.name, False, "rejected" if ok else "failed", r.status_code, detail,
                   latency)


async def invalid(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    """One invalid request of a random kind."""
    return await send(client, t, rng.choice(cases(t, rng)))


async def partial_body(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    """Declare a body, send only part of it, wait a little, close the socket."""
    url = httpx.URL(t.url)
    body = b'{"prompt": "cut short", "max_tokens": 4}'
    cut = rng.randrange(len(body))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    try:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(head.encode() + body[:cut])
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        writer.close()
        await writer.wait_closed()
    except OSError as e:
        return Outcome("partial_body", False, "failed", None, f"{type(e).__name__}: {e}")
    return Outcome("partial_body", False, "dropped", None, f"after {cut}/{len(body)} bytes")

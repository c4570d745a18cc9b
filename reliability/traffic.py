"""The soak's traffic: valid requests (chat and completions, streaming and not, prompts
near the context limit, clients that go away early) and invalid ones (malformed JSON,
wrong types, out-of-range values, unknown fields, over-long prompts, unknown models and
routes).  Each request ends as one ``Outcome``.

Results: ``completed`` (a valid request got its whole answer: every choice finished with
``stop`` or ``length``), ``dropped`` (its client went away on purpose first),
``rejected`` (an invalid request got a 4xx), ``refused`` (a valid request got 429),
``failed`` (anything else: a 5xx, a 2xx without a proper ending, an error event in a
stream, a transport error, a 4xx for a valid request or a 2xx for an invalid one).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from slabserve.loadtest.sse import parse_line, sse_lines

FINISHED = ("stop", "length")
WORDS = ("slab", "page", "block", "token", "cache", "batch", "queue", "model", "serve",
         "stream", "prefill", "decode", "kernel", "memory", "budget", "request")


@dataclass(frozen=True)
class Target:
    """The server under test: base URL, served model id, context limit (tokens) and
    request body limit (bytes)."""

    url: str
    model: str
    max_context: int
    max_body_bytes: int = 8 << 20


@dataclass(frozen=True)
class Outcome:
    scenario: str
    valid: bool
    result: str
    status: int | None
    detail: str = ""
    latency_s: float = 0.0
    retry_after: str | None = None


# uvicorn closes a keep-alive connection after 5 s idle; a client that keeps it longer may
# send on a socket the server is closing (ReadError, not the server's fault): expire first.
KEEPALIVE_EXPIRY_S = 2.0


def limits(connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                        keepalive_expiry=KEEPALIVE_EXPIRY_S)


Scenario = Callable[[httpx.AsyncClient, Target, random.Random], Awaitable[Outcome]]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def token_prompt(rng: random.Random, n: int) -> list[int]:
    """``n`` token ids in the printable-ASCII range (inside any byte-level vocabulary)."""
    return [rng.randrange(32, 127) for _ in range(n)]


def sampling(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    return {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 30)}


def finished_choices(choices: list[dict], n: int) -> str | None:
    """None when there are ``n`` choices each finished with stop/length, else why not."""
    reasons = {c.get("index"): c.get("finish_reason") for c in choices}
    if len(reasons) != n:
        return f"expected {n} choices, got {len(reasons)}"
    bad = [r for r in reasons.values() if r not in FINISHED]
    return f"finish_reason {bad[0]!r}" if bad else None


async def read_stream(resp: httpx.Response, n: int) -> str | None:
    """Read an SSE body to its end; None when it ended properly ([DONE] after every
    choice finished with stop/length), else what was wrong."""
    reasons: dict[int, str] = {}
    done = False
    async for line in sse_lines(resp):
        chunk = parse_line(line)
        if chunk is None:
            continue
        done = done or chunk.done
        if chunk.error_json is not None:
            return f"error event: {chunk.error_json}"
        reasons.update(chunk.finishes)
    if not done:
        return "stream ended without [DONE]"
    return finished_choices([{"index": i, "finish_reason": r} for i, r in reasons.items()], n)


def classify_valid(name: str, status: int, problem: str | None, t0: float,
                   headers: httpx.Headers | None = None) -> Outcome:
    latency = time.perf_counter() - t0
    if status == 200 and problem is None:
        return Outcome(name, True, "completed", status, "", latency)
    if status == 429:
        ra = headers.get("retry-after") if headers is not None else None
        return Outcome(name, True, "refused", status, "queue full", latency, ra)
    return Outcome(name, True, "failed", status, problem or f"status {status}", latency)


async def generate(client: httpx.AsyncClient, t: Target, name: str, path: str, body: dict,
                   n: int = 1) -> Outcome:
    """Send one valid request and read its whole answer."""
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", t.url + path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return classify_valid(name, r.status_code, r.text[:200], t0, r.headers)
                return classify_valid(name, 200, await read_stream(r, n), t0)
        r = await client.post(t.url + path, json=body)
        problem = finished_choices(r.json().get("choices", []), n) if r.status_code == 200 \
            else r.text[:200]
        return classify_valid(name, r.status_code, problem, t0, r.headers)
    except (httpx.HTTPError, ValueError) as e:
        return Outcome(name, True, "failed", None, f"{type(e).__name__}: {e}",
                       time.perf_counter() - t0)


# ---- valid scenarios ------------------------------------------------------------------
async def chat(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    stream = rng.random() < 0.5
    body = {"model": t.model, "stream": stream, "max_tokens": rng.randint(1, 24),
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": words(rng, rng.randint(1, 30))}],
            **sampling(rng)}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return await generate(client, t, "chat_stream" if stream else "chat", "/v1/chat/completions",
                          body)


async def completion(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    stream = rng.random() < 0.5
    n = 2 if rng.random() < 0.2 else 1
    prompt = words(rng, rng.randint(1, 40)) if rng.random() < 0.5 \
        else token_prompt(rng, rng.randint(1, 64))
    body = {"model": t.model, "prompt": prompt, "stream": stream, "n": n,
            "max_tokens": rng.randint(1, 32), **sampling(rng)}
    if n > 1:
        body.update(temperature=0.8, seed=rng.randrange(1 << 30))
    name = "completion_stream" if stream else "completion"
    return await generate(client, t, name, "/v1/completions", body, n)


async def near_limit(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    """A prompt that leaves room for only a few new tokens inside the context."""
    max_tokens = rng.randint(1, 8)
    length = t.max_context - max_tokens - rng.randint(0, 3)
    body = {"model": t.model, "prompt": token_prompt(rng, length), "max_tokens": max_tokens,
            "stream": rng.random() < 0.5, "temperature": 0.0}
    return await generate(client, t, "near_limit", "/v1/completions", body)


async def disconnect_stream(client: httpx.AsyncClient, t: Target,
                            rng: random.Random) -> Outcome:
    """Open a long stream, read a few chunks, then close the connection."""
    name, t0 = "disconnect_stream", time.perf_counter()
    body = {"model": t.model, "prompt": words(rng, 20), "stream": True, "max_tokens":
            min(256, t.max_context // 2), "temperature": 0.0, "ignore_eos": True}
    keep = rng.randint(0, 4)
    try:
        async with client.stream("POST", t.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return classify_valid(name, r.status_code, r.text[:200], t0, r.headers)
            seen = 0
            async for line in sse_lines(r):
                if line.startswith("data:"):
                    if '"error"' in line:
                        return Outcome(name, True, "failed", 200, line[:200])
                    seen += 1
                    if seen > keep:
                        break
    except httpx.HTTPError as e:
        return Outcome(name, True, "failed", None, f"{type(e).__name__}: {e}")
    return Outcome(name, True, "dropped", 200, f"after {seen} chunks",
                   time.perf_counter() - t0)


async def disconnect_wait(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    """A non-streaming request whose client gives up after a short while."""
    name, t0 = "disconnect_wait", time.perf_counter()
    body = {"model": t.model, "messages": [{"role": "user", "content": words(rng, 10)}],
            "max_tokens": min(256, t.max_context // 2), "temperature": 0.0, "ignore_eos": True}
    try:
        r = await asyncio.wait_for(client.post(t.url + "/v1/chat/completions", json=body),
                                   rng.uniform(0.02, 0.5))
    except asyncio.TimeoutError:
        return Outcome(name, True, "dropped", None, "client timeout", time.perf_counter() - t0)
    except httpx.HTTPError as e:
        return Outcome(name, True, "failed", None, f"{type(e).__name__}: {e}")
    problem = finished_choices(r.json().get("choices", []), 1) if r.status_code == 200 \
        else r.text[:200]
    return classify_valid(name, r.status_code, problem, t0, r.headers)

"""One streaming completion request over httpx, timed on the client's clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx

from slabserve.loadtest.metrics import RequestRecord
from slabserve.loadtest.sse import ProtocolError, parse_line, sse_lines

EosMode = Literal["ignore_eos", "logit_bias", "none"]
EOS_BIAS = -100.0  # the OpenAI API's floor; enough to keep EOS from greedy argmax


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server.

    ``eos_mode`` makes every request produce exactly ``max_tokens`` tokens: ``ignore_eos``
    sends ``"ignore_eos": true`` (vLLM's extension; ours); ``logit_bias`` biases
    ``eos_token_ids`` away (mlx_lm.server has no ``ignore_eos`` but honours ``logit_bias``);
    ``none`` lets the server stop at EOS (short outputs are then counted).
    ``model`` is sent as the request's ``model`` field when not None (mlx_lm.server loads
    whatever path it is given there, so it gets None).
    """

    base_url: str
    model: str | None = None
    eos_mode: EosMode = "ignore_eos"
    eos_token_ids: tuple[int, ...] = ()
    metrics_path: str | None = "/metrics"
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eos_mode == "logit_bias" and not self.eos_token_ids:
            raise ValueError("eos_mode='logit_bias' needs eos_token_ids")


def build_body(ep: Endpoint, prompt: str, max_tokens: int) -> dict:
    """The JSON body of one greedy streaming ``/v1/completions`` request."""
    return _greedy_body(ep, {"prompt": prompt}, max_tokens)


def build_chat_body(ep: Endpoint, messages: list[dict], max_tokens: int) -> dict:
    """The JSON body of one greedy streaming ``/v1/chat/completions`` request."""
    return _greedy_body(ep, {"messages": [dict(m) for m in messages]}, max_tokens)


def _greedy_body(ep: Endpoint, inputs: dict, max_tokens: int) -> dict:
    """``inputs`` plus greedy sampling, streaming with usage, and the endpoint's way of
    forcing ``max_tokens`` outputs."""
    body: dict = {
        **inputs,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ep.model is not None:
        body["model"] = ep.model
    if ep.eos_mode == "ignore_eos":
        body["ignore_eos"] = True
    elif ep.eos_mode == "logit_bias":
        body["logit_bias"] = {str(t): EOS_BIAS for t in ep.eos_token_ids}
    body.update(ep.extra_body)
    return body


def _clip(text: str, n: int = 300) -> str:
    """One line of at most ``n`` characters for a report."""
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."


def _failure_kind(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "disconnect"
    if isinstance(exc, ProtocolError):
        return "protocol"
    return type(exc).__name__


class _Stream:
    """Accumulates chunk arrival times and usage of one response."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.parts: list[str] = []
        self.usage: dict | None = None
        self.finished_at: float | None = None
        self.done = False
        self.error: str | None = None
        self.detail: str | None = None

    def feed(self, line: str, now: float) -> None:
        chunk = parse_line(line)
        if chunk is None:
            return
        if chunk.error is not None:
            self.error = "stream_error"
            self.detail = self.detail or _clip(chunk.error)
        if chunk.has_content:
            self.times.append(now)
            self.parts.append(chunk.text)
        if chunk.finish_reason and self.finished_at is None:
            self.finished_at = now
        if chunk.usage:
            self.usage = chunk.usage
        self.done = self.done or chunk.done

    @property
    def text(self) -> str:
        """The content streamed so far."""
        return "".join(self.parts)

    @property
    def cached_reported(self) -> bool:
        """Whether the usage said ``prompt_tokens_details.cached_tokens`` (servers without
        prefix caching, or that do not tell, leave it out)."""
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens") is not None

    def record(self, start: float, end: float) -> RequestRecord:
        times = self.times
        if not times and self.finished_at is not None:
            times = [self.finished_at]  # tokens that all decoded to '' until the end
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        error = self.error
        if error is None and not (self.done or self.finished_at is not None):
            error = "incomplete"
        return RequestRecord(
            start=start, end=end, chunk_times=tuple(times),
            output_tokens=int(usage.get("completion_tokens") or len(times)),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0), error=error,
            detail=self.detail)


async def send_one(client: httpx.AsyncClient, ep: Endpoint, prompt: str, max_tokens: int,
                   clock: Callable[[], float] = time.perf_counter) -> RequestRecord:
    """Send one request and time it; never raises for server or network failures (they come
    back as ``RequestRecord.error``)."""
    url = ep.base_url.rstrip("/") + "/v1/completions"
    rec, _ = await stream_post(client, url, build_body(ep, prompt, max_tokens), clock)
    return rec


async def stream_post(client: httpx.AsyncClient, url: str, body: dict,
                      clock: Callable[[], float] = time.perf_counter
                      ) -> tuple[RequestRecord, _Stream]:
    """POST ``body`` to ``url`` and read its event stream, timed on ``clock``: the record
    and the stream (its text and usage).  Never raises for server or network failures."""
    stream = _Stream()
    start = clock()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                return RequestRecord(start=start, end=clock(), error=f"http_{resp.status_code}",
                                     detail=_clip(raw.decode("utf-8", "replace"))), stream
            async for line in sse_lines(resp):
                stream.feed(line, clock())
    except (httpx.HTTPError, ProtocolError) as exc:
        return RequestRecord(start=start, end=clock(), error=_failure_kind(exc),
                             detail=_clip(str(exc) or type(exc).__name__)), stream
    return stream.record(start, clock()), stream

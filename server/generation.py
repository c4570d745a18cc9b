"""Driving the serving loop for one HTTP request: admit every choice (all or none), merge their
delta streams, track each choice, and frame server-sent events.

Invariant: every loop request this module admitted is either finished (a delta with a
``finish_reason`` was seen) or aborted through ``ServingLoop.abort`` when its consumer goes
away (client disconnect, cancellation, error in another choice).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from slabserve.scheduler.api import Delta, Request, RequestError, ServingLoop, TokenLogprob
from slabserve.server.metrics import ChoiceTimer

log = logging.getLogger("slabserve.server")
DONE = "data: [DONE]\n\n"
T = TypeVar("T")


# Line separators that some SSE clients (httpx's aiter_lines) split on: escape them so one
# event stays one line; the rest of the text stays raw UTF-8.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(obj: object) -> str:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


@dataclass
class Choice:
    """One loop request (one choice of the response) and what it produced so far."""

    index: int
    request: Request
    timer: ChoiceTimer
    iterator: AsyncIterator[Delta] | None = None
    first: Delta | None = None
    last: Delta | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    aborted: bool = False
    cached_tokens: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_first(self) -> bool:
        return self.last is self.first

    def update(self, delta: Delta) -> None:
        self.timer.on_delta(delta)
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.cached_tokens = delta.cached_tokens
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.error = delta.error


_ENDED = Delta((), "", finish_reason="abort", error="the serving loop ended the stream early")


async def _close(it: AsyncIterator[Delta] | None) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing is best effort; abort() follows
            pass


async def _admit_one(serving: ServingLoop, choice: Choice) -> None:
    it = serving.generate(choice.request)
    try:
        choice.first = await anext(it, _ENDED)
    except BaseException:
        await _close(it)
        raise
    choice.iterator = it


async def admit(serving: ServingLoop, choices: list[Choice]) -> None:
    """Admit every choice and wait for each one's first delta (so a refusal is known
    before any response header goes out).  If one is refused or this is cancelled, the
    others are aborted and the first error is raised."""
    tasks = [asyncio.ensure_future(_admit_one(serving, c)) for c in choices]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        abort_all(serving, choices)
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for c in choices:
            await _close(c.iterator)
        abort_all(serving, choices)
        refusals = [e for e in errors if isinstance(e, RequestError)]
        raise (refusals or errors)[0]


def abort_all(serving: ServingLoop, choices: list[Choice], abandoned: bool = False) -> None:
    """Abort every unfinished choice (once each).  ``abandoned``: its consumer left, so
    it is counted as finished by ``abort`` in the metrics."""
    for c in choices:
        if c.finish_reason is None and not c.aborted:
            c.aborted = True
            if abandoned:
                c.timer.on_abandon()
            try:
                serving.abort(c.request.request_id)
            except Exception:  # noqa: BLE001 - unknown or finished ids are fine
                pass


async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
    try:
        async for delta in choice.iterator:
            await queue.put((choice, delta))
            if delta.finish_reason is not None:
                break
        else:
            await queue.put((choice, _ENDED))
    except Exception as e:  # noqa: BLE001 - the serving loop failed this choice, not the server
        message = e.message if isinstance(e, RequestError) else "the serving loop failed"
        if not isinstance(e, RequestError):
            log.exception("serving stream of %s failed", choice.request.request_id)
        await queue.put((choice, Delta((), "", finish_reason="error", error=message)))
    finally:
        await queue.put((choice, None))


async def merge(serving: ServingLoop, choices: list[Choice]) -> AsyncIterator[Choice]:
    """Apply every delta of every admitted choice in arrival order, yielding the choice
    after each update (its newest delta is ``choice.last``).  Closing this generator early
    aborts the unfinished choices."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(c, queue))
             for c in choices if c.first.finish_reason is None]
    try:
        for c in choices:
            c.update(c.first)
            c.last = c.first
            yield c
        pending = len(tasks)
        while pending:
            choice, delta = await queue.get()
            if delta is None:
                pending -= 1
            elif choice.finish_reason is None:
                choice.update(delta)
                choice.last = delta
                yield choice
    finally:
        for t in tasks:
            t.cancel()
        abort_all(serving, choices, abandoned=True)


class Format(Protocol):
    """How one endpoint renders choices: chunk payloads while streaming, one body at the
    end otherwise."""

    def opening(self, choice: Choice) -> dict | None: ...

    def delta(self, choice: Choice) -> dict | None: ...

    def chunk(self, choice_objs: list[dict]) -> dict: ...


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix
    cache supplied (the prompt is counted once: the least any choice found cached)."""
    completion = sum(c.completion_tokens for c in choices)
    cached = min((c.cached_tokens for c in choices), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None,
                          "code": "engine_error"}})


async def stream_events(serving: ServingLoop, choices: list[Choice], fmt: Format,
                        prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body: an opening chunk per choice (if the format has one), a chunk per
    delta, a usage chunk with ``choices: []`` when asked, then ``[DONE]``.  A choice that
    fails in the serving loop sends an error event instead of its last chunk."""
    def frame(objs: list[dict], use: dict | None = None) -> str:
        body = fmt.chunk(objs)
        if include_usage:
            body["usage"] = use
        return sse(body)

    for c in choices:
        opening = fmt.opening(c)
        if opening is not None:
            yield frame([opening])
    async with aclosing(merge(serving, choices)) as merged:
        async for c in merged:
            if c.finish_reason == "error":
                yield error_event(c.error or "generation failed")
                continue
            obj = fmt.delta(c)
            if obj is not None:
                yield frame([obj])
    if include_usage:
        yield frame([], usage(prompt_tokens, choices))
    yield DONE


async def collect(serving: ServingLoop, choices: list[Choice]) -> bool:
    """Run every choice to its end (their state is in the ``Choice`` objects)."""
    async with aclosing(merge(serving, choices)) as merged:
        async for _ in merged:
            pass
    return True


async def while_connected(receive, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first (then cancel it, which aborts
    its serving requests, and return None).  ``receive`` is the ASGI receive callable of a
    request whose body has been read."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # let it abort its requests
    return None

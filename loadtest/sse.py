"""Parsing OpenAI-style server-sent-event lines (``/v1/completions`` and chat) into chunks.

Pure functions; the client timestamps each returned chunk as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Chunk:
    """What one ``data:`` line said.  ``text`` is the content increment ('' for none);
    ``finish_reason`` the first choice's that has one, ``finishes`` every ``(choice index,
    finish reason)`` of the line; ``usage`` is the server's token accounting when the line
    carried it; ``done`` marks the ``[DONE]`` sentinel; ``error`` a server error message
    sent inside the stream and ``error_json`` that error object as the server sent it."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False
    error: str | None = None
    finishes: tuple[tuple[int, str], ...] = ()
    error_json: str | None = None

    @property
    def has_content(self) -> bool:
        return bool(self.text)


class ProtocolError(ValueError):
    """A line that is not valid SSE JSON for this API."""


def _choice_text(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


def parse_line(line: str) -> Chunk | None:
    """One line of the stream -> a Chunk, or None for blank lines, comments (``: keepalive``
    from mlx_lm.server) and non-data fields.  Raises ProtocolError on undecodable data."""
    line = line.strip()
    if not line or line.startswith(":") or not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"bad JSON in stream: {payload[:80]!r}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("stream data is not an object")
    if "error" in obj:
        err = obj["error"]
        msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return Chunk(error=msg, error_json=json.dumps(err))
    choices = obj.get("choices") or []
    text = "".join(_choice_text(c) for c in choices)
    finishes = tuple((c.get("index", i), c["finish_reason"])
                     for i, c in enumerate(choices) if c.get("finish_reason"))
    return Chunk(text=text, finish_reason=finishes[0][1] if finishes else None,
                 usage=obj.get("usage"), finishes=finishes)


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """Lines of an event stream split the SSE way (LF, CRLF).  Not ``aiter_lines``: it
    splits like ``str.splitlines``, also on U+0085, U+2028 and U+2029, which JSON may leave
    unescaped inside strings, cutting one event in two."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8")
    if buf:
        yield buf.removesuffix(b"\r").decode("utf-8")

"""``--scenario chat``: multi-turn chat sessions that share one long system prompt, the load
that automatic prefix caching is for.

``sessions`` workers run concurrently, one chat session each, ``turns`` turns per session.
Every session starts with the same system prompt (``system_tokens`` tokens), then its own
user message (``user_tokens``); each turn sends the WHOLE history (system, the user messages
and assistant replies so far, the new user message) to ``/v1/chat/completions``, streaming,
greedy, ``reply_tokens`` forced as the other runs force them (``ignore_eos`` /
``logit_bias``), and appends the reply's text to the history as a chat client does.  Turn
``k`` thus sends ``2k`` messages.  A failed turn ends its session (its history has no reply
to go on with).

Before the measured sessions, ``warmup`` warm-up sessions run the same scenario (every
turn) on texts of their own: another shared system prompt and other user messages (no
prefix shared with the measured ones beyond the chat template's first tokens); they are
discarded, so that shapes compiled on first use (a GPU's attention graphs and kernels for
each batch and context) are warm for every server alike and the measured turns show the
steady state.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from slabserve.loadtest.client import Endpoint, build_chat_body, stream_post
from slabserve.loadtest.metrics import Dist, RequestRecord
from slabserve.loadtest.prompts import Tokenizer, make_prompt
from slabserve.loadtest.runner import _Progress
from slabserve.loadtest.traces import snapshot

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class ChatSpec:
    """The scenario's shape; ``warmup``: warm-up sessions (None: as many as measured)."""

    sessions: int = 4
    turns: int = 4
    system_tokens: int = 3000
    user_tokens: int = 64
    reply_tokens: int = 32
    warmup: int | None = None
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (self.sessions, self.turns, self.system_tokens, self.user_tokens,
                 self.reply_tokens)
        if min(sizes) < 1:
            raise ValueError("sessions, turns and the token counts must be >= 1")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError("warmup must be >= 0")

    @property
    def warmup_requests(self) -> int:
        return self.sessions if self.warmup is None else self.warmup


@dataclass(frozen=True)
class ChatTexts:
    """The scenario's text: the shared system prompt, ``users[session][turn - 1]``, and
    the warm-up sessions' own system prompt and user messages (same shapes)."""

    system: str
    users: tuple[tuple[str, ...], ...]
    warmup_system: str = ""
    warmup: tuple[tuple[str, ...], ...] = ()


def build_chat_texts(spec: ChatSpec, tok: Tokenizer) -> ChatTexts:
    """Texts of ``spec``'s token lengths under ``tok`` (``make_prompt``: each one distinct,
    starting differently); the same for every server compared."""
    def text(n: int, index: int) -> str:
        return make_prompt(tok, n, index, spec.seed)

    users = tuple(tuple(text(spec.user_tokens, 1 + s * spec.turns + t)
                        for t in range(spec.turns)) for s in range(spec.sessions))
    base = 2 + spec.sessions * spec.turns
    warm = tuple(tuple(text(spec.user_tokens, base + s * spec.turns + t)
                       for t in range(spec.turns)) for s in range(spec.warmup_requests))
    return ChatTexts(text(spec.system_tokens, 0), users, text(spec.system_tokens, base - 1),
                     warm)


@dataclass(frozen=True)
class TurnRecord:
    """One turn of one session (both 0-based session, 1-based turn): the request's
    record, how many messages it sent, the reply's text, and whether the server reported
    ``prompt_tokens_details.cached_tokens`` (``record.cached_tokens`` is 0 when not)."""

    session: int
    turn: int
    messages: int
    record: RequestRecord
    reply: str = ""
    cached_reported: bool = False


async def send_chat(client: httpx.AsyncClient, ep: Endpoint, messages: list[dict],
                    max_tokens: int) -> tuple[RequestRecord, str, bool]:
    """One streamed chat request: (record, reply text, cached_tokens reported)."""
    url = ep.base_url.rstrip("/") + CHAT_PATH
    rec, stream = await stream_post(client, url, build_chat_body(ep, messages, max_tokens))
    return rec, stream.text, stream.cached_reported


async def run_session(client: httpx.AsyncClient, ep: Endpoint, spec: ChatSpec,
                      system: str, users: Sequence[str], session: int,
                      progress: _Progress | None = None) -> list[TurnRecord]:
    """One chat session, turn after turn, the whole history sent each time."""
    messages = [{"role": "system", "content": system}]
    out: list[TurnRecord] = []
    for turn, user in enumerate(users, start=1):
        messages.append({"role": "user", "content": user})
        rec, reply, reported = await send_chat(client, ep, messages, spec.reply_tokens)
        out.append(TurnRecord(session, turn, len(messages), rec, reply, reported))
        if progress is not None:
            progress.update(not rec.ok)
        if not rec.ok:
            break
        messages.append({"role": "assistant", "content": reply})
    return out


@dataclass(frozen=True)
class ChatSummary:
    """One chat run's numbers.  TTFT split by turn: ``first_ttft`` over turn 1 of every
    session (the system prompt is new), ``later_ttft`` over turns >= 2 (all but the new
    user message was sent before).  ``output_tok_s`` divides by ``wall_s``: first request
    start to last request end.  ``cached_share``: sum of cached_tokens / sum of
    prompt_tokens over the successful responses that reported cached_tokens; None when none
    did (``cached_tokens`` None then too)."""

    requests_ok: int
    requests_failed: int
    failures: dict[str, int]
    wall_s: float
    output_tokens: int
    output_tok_s: float
    prompt_tokens: int
    cached_tokens: int | None
    cached_share: float | None
    short_outputs: int
    first_ttft: Dist
    later_ttft: Dist
    tpot: Dist


def summarize_chat(turns: Sequence[TurnRecord], reply_tokens: int = 0) -> ChatSummary:
    """Reduce the measured turns (warm-up excluded)."""
    ok = [t for t in turns if t.record.ok]
    recs = [t.record for t in turns]
    wall = max(r.end for r in recs) - min(r.start for r in recs) if recs else 0.0
    out_tokens = sum(t.record.output_tokens for t in ok)
    told = [t.record for t in ok if t.cached_reported]
    told_prompt = sum(r.prompt_tokens for r in told)
    cached = sum(r.cached_tokens for r in told) if told else None
    ttft = {first: [t.record.ttft for t in ok if (t.turn == 1) == first
                    and t.record.ttft is not None] for first in (True, False)}
    return ChatSummary(
        requests_ok=len(ok), requests_failed=len(turns) - len(ok),
        failures=dict(sorted(Counter(r.error for r in recs if not r.ok).items())),
        wall_s=wall, output_tokens=out_tokens,
        output_tok_s=out_tokens / wall if wall > 0 else math.nan,
        prompt_tokens=sum(t.record.prompt_tokens for t in ok),
        cached_tokens=cached,
        cached_share=cached / told_prompt if told and told_prompt else None,
        short_outputs=sum(1 for t in ok if t.record.output_tokens < reply_tokens),
        first_ttft=Dist.of_seconds(ttft[True]), later_ttft=Dist.of_seconds(ttft[False]),
        tpot=Dist.of_seconds([t.record.tpot for t in ok if t.record.tpot is not None]))


@dataclass(frozen=True)
class ChatResult:
    label: str
    spec: ChatSpec
    summary: ChatSummary
    turns: tuple[TurnRecord, ...]
    warmup_failed: int = 0
    server: str = ""  # --compare: the server process that served it ("pid P port N")
    preemptions: float | None = None  # the server's preemptions in the measured part


async def _warm(client: httpx.AsyncClient, ep: Endpoint, spec: ChatSpec,
                texts: ChatTexts) -> int:
    """The warm-up sessions, concurrently, every turn; how many requests failed."""
    done = await asyncio.gather(*(run_session(client, ep, spec, texts.warmup_system, users, s)
                                  for s, users in enumerate(texts.warmup)))
    return sum(1 for session in done for t in session if not t.record.ok)


async def run_chat(ep: Endpoint, spec: ChatSpec, texts: ChatTexts, label: str = "",
                   show_progress: bool = True,
                   transport: httpx.AsyncBaseTransport | None = None) -> ChatResult:
    """Warm up, then every session concurrently.  ``transport`` replaces the network
    (tests)."""
    limits = httpx.Limits(max_connections=max(spec.sessions, len(texts.warmup)) + 2)
    timeout = httpx.Timeout(spec.timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        warm_failed = await _warm(client, ep, spec, texts)
        before = await _preemptions(client, ep)
        bar = _Progress(spec.sessions * spec.turns, f"{label} chat", show_progress)
        try:
            done = await asyncio.gather(*(
                run_session(client, ep, spec, texts.system, texts.users[s], s, bar)
                for s in range(spec.sessions)))
        finally:
            bar.close()
        after = await _preemptions(client, ep)
    turns = tuple(t for session in done for t in session)
    preempted = None if before is None or after is None else after - before
    return ChatResult(label, spec, summarize_chat(turns, spec.reply_tokens), turns,
                      warm_failed, preemptions=preempted)


async def _preemptions(client: httpx.AsyncClient, ep: Endpoint) -> float | None:
    """The server's preemption counter from /metrics (vLLM's and our name), or None."""
    samples = await snapshot(client, ep.base_url, ep.metrics_path)
    if samples is None:
        return None
    found = [v for (name, _), v in samples.items()
             if name.endswith(":num_preemptions_total") or name.endswith(":num_preemptions")]
    return sum(found) if found else None


def print_chat(res: ChatResult, tag: str = "") -> None:
    """One line on stderr: counts, tok/s, first/later TTFT p50, cached share."""
    s = res.summary
    share = "n/a" if s.cached_share is None else f"{s.cached_share:.1%}"
    print(f"[{res.label}]{tag} chat {res.spec.sessions} sessions x {res.spec.turns} turns: "
          f"{s.requests_ok} ok, {s.requests_failed} failed, {s.output_tok_s:.2f} out tok/s, "
          f"TTFT p50 turn 1 {s.first_ttft.p50:.0f} ms, later {s.later_ttft.p50:.0f} ms, "
          f"cached {share}", file=sys.stderr)

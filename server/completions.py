"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids;
``n`` choices each; echo; legacy logprobs; streaming with optional usage; structured
outputs (``server.structured``)."""

from __future__ import annotations

import time
from dataclasses import replace

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from slabserve.scheduler.api import Request, TokenLogprob
from slabserve.server import structured
from slabserve.server.codec import TextCodec, finite_logprob
from slabserve.server.generation import Choice, stream_events, usage
from slabserve.server.metrics import ChoiceTimer
from slabserve.server.protocol import CompletionRequest
from slabserve.server.request_params import (
    base_params,
    bound_max_tokens,
    check_token_ids,
    choice_params,
)
from slabserve.server.state import Job, ServerContext

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def prompt_ids(prompt, codec: TextCodec) -> tuple[list[list[int]], list[str | None]]:
    """(token ids, original text or None) per prompt."""
    if isinstance(prompt, str):
        return [codec.encode(prompt)], [prompt]
    if isinstance(prompt[0], str):
        return [codec.encode(p) for p in prompt], list(prompt)
    if isinstance(prompt[0], int):
        ids = [list(prompt)]
    else:
        ids = [list(p) for p in prompt]
    for p in ids:
        check_token_ids(p, codec.vocab_size, "prompt")
    return ids, [None] * len(ids)


def legacy_logprobs(codec: TextCodec, lps: list[TokenLogprob], offset: int) -> dict:
    """The completions API's logprobs object; ``text_offset`` counts characters of the
    choice's text from ``offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = codec.token_text(lp.token_id)
        tokens.append(text)
        values.append(finite_logprob(lp.logprob))
        tops.append({codec.token_text(t): finite_logprob(v) for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


class CompletionFormat:
    """Renders completion choices (see ``server.generation.Format``)."""

    def __init__(self, job: Job, body: CompletionRequest, codec: TextCodec,
                 echo_texts: list[str]) -> None:
        self.job = job
        self.body = body
        self.codec = codec
        self.echo_texts = echo_texts  # per choice, "" without echo
        self.offsets: dict[int, int] = {}

    def chunk(self, choice_objs: list[dict]) -> dict:
        return {"id": self.job.id, "object": "text_completion", "created": self.job.created,
                "model": self.job.model, "choices": choice_objs}

    def opening(self, choice: Choice) -> dict | None:
        return None

    def _choice(self, c: Choice, text: str, lps: list[TokenLogprob] | None) -> dict:
        obj = {"index": c.index, "text": text, "logprobs": None,
               "finish_reason": c.finish_reason}
        if lps is not None:
            start = self.offsets.get(c.index, len(self.echo_texts[c.index]))
            obj["logprobs"] = legacy_logprobs(self.codec, lps, start)
            self.offsets[c.index] = start + sum(len(t) for t in obj["logprobs"]["tokens"])
        if self.body.return_token_ids and c.is_first:
            obj["prompt_token_ids"] = list(c.request.prompt_tokens)
        if self.body.return_token_ids:
            obj["token_ids"] = list(c.last.token_ids)
        return obj

    def delta(self, c: Choice) -> dict | None:
        d = c.last
        text = (self.echo_texts[c.index] if c.is_first else "") + d.text
        lps = list(d.logprobs or ()) if self.body.logprobs is not None else None
        wants_tokens = lps is not None or self.body.return_token_ids
        if not text and d.finish_reason is None and not (wants_tokens and d.token_ids):
            return None
        return self._choice(c, text, lps)

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict:
        objs = []
        for c in choices:
            lps = c.logprobs if self.body.logprobs is not None else None
            obj = self._choice(c, self.echo_texts[c.index] + "".join(c.text), lps)
            if self.body.return_token_ids:
                obj["prompt_token_ids"] = list(c.request.prompt_tokens)
                obj["token_ids"] = list(c.token_ids)
            objs.append(obj)
        body = self.chunk(objs)
        body["usage"] = usage(prompt_tokens, choices)
        return body


async def _choices(body: CompletionRequest, ctx: ServerContext, job: Job,
                   prompts: list[list[int]], t0: float) -> list[Choice]:
    ctx.check_fanout(body.n * len(prompts))
    base = base_params(body, body.logprobs, ctx.codec.vocab_size)
    found = structured.requested_spec(body)
    if found is not None:
        await structured.check(ctx.serving, *found)
        base = replace(base, constraint=found[0])
    out = []
    for pi, ids in enumerate(prompts):
        params = bound_max_tokens(base, len(ids), body.max_tokens, DEFAULT_MAX_TOKENS,
                                  ctx.max_context)
        for j in range(body.n):
            index = pi * body.n + j
            req = Request(f"{job.id}-{index}", tuple(ids), choice_params(params, j),
                          body.cache_salt)
            out.append(Choice(index, req, ChoiceTimer(ctx.metrics, t0)))
    return out


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: HTTPRequest) -> Response:
    t0 = time.perf_counter()
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(body.model)
    ctx.check_admitting()
    prompts, texts = prompt_ids(body.prompt, ctx.codec)
    job = Job.new("cmpl", ctx.model_name)
    choices = await _choices(body, ctx, job, prompts, t0)
    echo = [""] * len(choices)
    if body.echo:
        echo = [texts[c.index // body.n] if texts[c.index // body.n] is not None
                else ctx.codec.decode(prompts[c.index // body.n]) for c in choices]
    fmt = CompletionFormat(job, body, ctx.codec, echo)
    prompt_tokens = sum(len(p) for p in prompts)
    await ctx.admit(choices)
    if body.stream:
        return ctx.stream(stream_events(ctx.serving, choices, fmt, prompt_tokens,
                                        body.include_usage), choices)
    if not await ctx.collect(request, choices):
        return Response(status_code=499)
    return JSONResponse(fmt.response(choices, prompt_tokens))

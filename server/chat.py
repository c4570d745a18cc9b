"""POST /v1/chat/completions: messages through the tokenizer's chat template; streams
open with the assistant role, then content deltas, then the finish reason."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from slabserve.scheduler.api import Request, TokenLogprob
from slabserve.server.codec import TextCodec, finite_logprob
from slabserve.server.errors import bad_request
from slabserve.server.generation import Choice, stream_events, usage
from slabserve.server.metrics import ChoiceTimer
from slabserve.server.protocol import ChatCompletionRequest
from slabserve.server.sampling import base_params, bound_max_tokens, choice_params
from slabserve.server.state import Job, ServerContext

router = APIRouter()
log = logging.getLogger("slabserve.server")


def chat_prompt(body: ChatCompletionRequest, codec: TextCodec) -> list[int]:
    """Token ids of the conversation; a template that rejects it is a 400."""
    messages = []
    for m in body.messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    try:
        return codec.chat_prompt(messages, body.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds; all mean bad input
        log.info("chat template refused the messages: %s", e)
        raise bad_request(f"messages: the chat template cannot render them: {e}",
                          "messages") from None


def _entry(codec: TextCodec, token_id: int, logprob: float) -> dict:
    text = codec.token_text(token_id)
    return {"token": text, "logprob": finite_logprob(logprob),
            "bytes": list(text.encode("utf-8"))}


def chat_logprobs(codec: TextCodec, lps: list[TokenLogprob]) -> dict:
    """The chat API's logprobs object: one entry per token with its top alternatives."""
    content = []
    for lp in lps:
        entry = _entry(codec, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_entry(codec, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


class ChatFormat:
    """Renders chat choices (see ``server.generation.Format``)."""

    def __init__(self, job: Job, body: ChatCompletionRequest, codec: TextCodec) -> None:
        self.job = job
        self.body = body
        self.codec = codec

    def chunk(self, choice_objs: list[dict]) -> dict:
        return {"id": self.job.id, "object": "chat.completion.chunk",
                "created": self.job.created, "model": self.job.model, "choices": choice_objs}

    def opening(self, choice: Choice) -> dict | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def delta(self, c: Choice) -> dict | None:
        d = c.last
        wants_tokens = self.body.logprobs or self.body.return_token_ids
        if not d.text and d.finish_reason is None and not (wants_tokens and d.token_ids):
            return None
        lps = None
        if self.body.logprobs and d.logprobs:
            lps = chat_logprobs(self.codec, list(d.logprobs))
        obj = {"index": c.index, "delta": {"content": d.text} if d.text else {},
               "logprobs": lps, "finish_reason": c.finish_reason}
        if self.body.return_token_ids:
            obj["token_ids"] = list(d.token_ids)
        return obj

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict:
        objs = []
        for c in choices:
            obj = {"index": c.index,
                   "message": {"role": "assistant", "content": "".join(c.text)},
                   "logprobs": chat_logprobs(self.codec, c.logprobs) if self.body.logprobs
                   else None,
                   "finish_reason": c.finish_reason}
            if self.body.return_token_ids:
                obj["prompt_token_ids"] = list(c.request.prompt_tokens)
                obj["token_ids"] = list(c.token_ids)
            objs.append(obj)
        return {"id": self.job.id, "object": "chat.completion", "created": self.job.created,
                "model": self.job.model, "choices": objs,
                "usage": usage(prompt_tokens, choices)}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: HTTPRequest) -> Response:
    t0 = time.perf_counter()
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(body.model)
    ctx.check_admitting()
    ctx.check_fanout(body.n)
    ids = chat_prompt(body, ctx.codec)
    params = bound_max_tokens(base_params(body, body.logprobs_k, ctx.codec.vocab_size),
                              len(ids), body.max_new, None, ctx.max_context)
    job = Job.new("chatcmpl", ctx.model_name)
    choices = [Choice(j, Request(f"{job.id}-{j}", tuple(ids), choice_params(params, j),
                                 body.cache_salt),
                      ChoiceTimer(ctx.metrics, t0)) for j in range(body.n)]
    fmt = ChatFormat(job, body, ctx.codec)
    await ctx.admit(choices)
    if body.stream:
        return ctx.stream(stream_events(ctx.serving, choices, fmt, len(ids),
                                        body.include_usage), choices)
    if not await ctx.collect(request, choices):
        return Response(status_code=499)
    return JSONResponse(fmt.response(choices, len(ids)))

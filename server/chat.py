"""POST /v1/chat/completions: messages (and tools) through the tokenizer's chat template;
streams open with the assistant role, then content deltas (and tool-call deltas), then the
finish reason.  Structured outputs: ``server.structured``; tools: ``server.chattools``."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from slabserve.scheduler.api import GrammarSpec, Request, TokenLogprob
from slabserve.server import structured
from slabserve.server.chattools import ToolSetup, ToolStream, finish_reason, tool_setup
from slabserve.server.codec import TextCodec, finite_logprob
from slabserve.server.errors import bad_request
from slabserve.server.generation import Choice, stream_events, usage
from slabserve.server.metrics import ChoiceTimer
from slabserve.server.protocol import ChatCompletionRequest
from slabserve.server.request_params import base_params, bound_max_tokens, choice_params
from slabserve.server.state import Job, ServerContext

router = APIRouter()
log = logging.getLogger("slabserve.server")


def chat_prompt(body: ChatCompletionRequest, codec: TextCodec,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation (and ``tools``); a template that rejects it is a 400."""
    messages = [m.for_template() for m in body.messages]
    try:
        return codec.chat_prompt(messages, body.add_generation_prompt, tools)
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
    """Renders chat choices (see ``server.generation.Format``); with tools, content and
    tool calls are split by the tool-call family."""

    def __init__(self, job: Job, body: ChatCompletionRequest, codec: TextCodec,
                 tools: ToolSetup) -> None:
        self.job = job
        self.body = body
        self.codec = codec
        self.tools = tools
        self.streams: dict[int, ToolStream] = {}

    def chunk(self, choice_objs: list[dict]) -> dict:
        return {"id": self.job.id, "object": "chat.completion.chunk",
                "created": self.job.created, "model": self.job.model, "choices": choice_objs}

    def opening(self, choice: Choice) -> dict | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def _split(self, c: Choice) -> tuple[dict, str | None]:
        """(delta, finish reason) of the choice's newest output."""
        d = c.last
        if not self.tools.active:
            return ({"content": d.text} if d.text else {}), c.finish_reason
        stream = self.streams.setdefault(c.index, ToolStream(self.tools.family))
        text, calls = stream.feed(d.text, c.finish_reason is not None)
        delta: dict = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [call.openai(i) for i, call in enumerate(calls)]
        return delta, finish_reason(c.finish_reason, calls)

    def delta(self, c: Choice) -> dict | None:
        d = c.last
        wants_tokens = self.body.logprobs or self.body.return_token_ids
        content, reason = self._split(c)
        if not content and reason is None and not (wants_tokens and d.token_ids):
            return None
        lps = None
        if self.body.logprobs and d.logprobs:
            lps = chat_logprobs(self.codec, list(d.logprobs))
        obj = {"index": c.index, "delta": content, "logprobs": lps, "finish_reason": reason}
        if self.body.return_token_ids:
            obj["token_ids"] = list(d.token_ids)
        return obj

    def message(self, c: Choice) -> tuple[dict, str | None]:
        """The whole message of a finished choice, and its finish reason."""
        text = "".join(c.text)
        if not self.tools.active:
            return {"role": "assistant", "content": text}, c.finish_reason
        content, calls = self.tools.family.parse(text)
        msg: dict = {"role": "assistant", "content": content if calls else text}
        if calls:
            msg["tool_calls"] = [call.openai() for call in calls]
        return msg, finish_reason(c.finish_reason, calls)

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict:
        objs = []
        for c in choices:
            msg, reason = self.message(c)
            obj = {"index": c.index, "message": msg,
                   "logprobs": chat_logprobs(self.codec, c.logprobs) if self.body.logprobs
                   else None,
                   "finish_reason": reason}
            if self.body.return_token_ids:
                obj["prompt_token_ids"] = list(c.request.prompt_tokens)
                obj["token_ids"] = list(c.token_ids)
            objs.append(obj)
        return {"id": self.job.id, "object": "chat.completion", "created": self.job.created,
                "model": self.job.model, "choices": objs,
                "usage": usage(prompt_tokens, choices)}


async def _constraint(body: ChatCompletionRequest, ctx: ServerContext,
                      tools: ToolSetup) -> GrammarSpec | None:
    """The output constraint (tool calls or structured output), compiled or a 400."""
    found = structured.requested_spec(body)
    if tools.spec is not None:
        if found is not None:
            raise bad_request(f"{found[1]}: cannot be combined with tool_choice "
                              f"{body.tool_mode!r} (the output is a tool call)", found[1])
        found = (tools.spec, "tools")
    if found is None:
        return None
    await structured.check(ctx.serving, *found)
    return found[0]


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: HTTPRequest) -> Response:
    t0 = time.perf_counter()
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(body.model)
    ctx.check_admitting()
    ctx.check_fanout(body.n)
    tools = tool_setup(body, ctx.config.tool_call_parser, ctx.codec.tokenizer)
    ids = chat_prompt(body, ctx.codec, tools.template_tools)
    params = bound_max_tokens(base_params(body, body.logprobs_k, ctx.codec.vocab_size),
                              len(ids), body.max_new, None, ctx.max_context)
    params = replace(params, constraint=await _constraint(body, ctx, tools))
    job = Job.new("chatcmpl", ctx.model_name)
    choices = [Choice(j, Request(f"{job.id}-{j}", tuple(ids), choice_params(params, j),
                                 body.cache_salt),
                      ChoiceTimer(ctx.metrics, t0)) for j in range(body.n)]
    fmt = ChatFormat(job, body, ctx.codec, tools)
    await ctx.admit(choices)
    if body.stream:
        return ctx.stream(stream_events(ctx.serving, choices, fmt, len(ids),
                                        body.include_usage), choices)
    if not await ctx.collect(request, choices):
        return Response(status_code=499)
    return JSONResponse(fmt.response(choices, len(ids)))

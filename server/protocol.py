"""Request bodies of the OpenAI API as pydantic models.

Unknown fields are refused (400) so that nothing a client sends is silently ignored;
fields the serving loop cannot honour are refused by ``server.sampling`` with their name.
Extensions shared with vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids`` and ``return_token_ids`` (token ids of prompt and output per choice).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

MAX_STOP = 4

Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    return_token_ids: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise ValueError("stop: empty stop strings are not allowed")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


PROMPT_SHAPES = ("a string, a list of strings, a list of token ids or a list of lists of "
                 "token ids")


def _token_list(value: list) -> list[int] | None:
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value
    return None


def check_prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """The completions ``prompt`` in one of its four shapes, non-empty."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be {PROMPT_SHAPES} (non-empty)")
    if all(isinstance(p, str) for p in value):
        return value
    ids = _token_list(value)
    if ids is not None:
        return ids
    if all(isinstance(p, list) and p and _token_list(p) is not None for p in value):
        return value
    raise ValueError(f"must be {PROMPT_SHAPES} (non-empty)")


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, _TOKEN_IDS, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}
Prompt = Annotated[Any, AfterValidator(check_prompt), WithJsonSchema(PROMPT_SCHEMA)]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: echo with logprobs needs prompt logprobs (not supported)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content as a string or a list of text parts.  Fields the OpenAI SDK
    echoes back on assistant messages (``refusal``, ``tool_calls``...) are accepted only
    when null."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _no_extras(self) -> ChatMessage:
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        if extra:
            raise ValueError(f"unsupported message field(s): {', '.join(sorted(extra))}")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

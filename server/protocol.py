"""Request bodies of the OpenAI API as pydantic models.

Unknown fields are refused (400) so that nothing a client sends is silently ignored;
fields the serving loop cannot honour are refused by ``server.request_params`` with their name.
Extensions shared with vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids`` and ``return_token_ids`` (token ids of prompt and output per choice),
and the structured-output fields ``structured_outputs`` / ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` (``server.structured``).
Text anywhere in a body must be valid Unicode: a lone surrogate (``"\ud800"``) is a 400.
Tool models (``tools``, ``tool_choice``, messages with ``tool_calls``): ``server.tooltypes``.
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

from slabserve.server.tooltypes import (
    ChatMessage,
    NamedToolChoice,
    TextPart,
    Tool,
    check_text,
)

MAX_STOP = 4

Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    """OpenAI's ``json_schema``: ``schema`` (the SDK's ``parse`` sends a pydantic model's),
    ``strict`` accepted (the schema is always enforced)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                           Field(discriminator="type")]


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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
    # structured outputs: OpenAI's, then vLLM's
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]],
                             Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_text(data)
        return data

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


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice: names a tool use but no tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} "
                             "in tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def tool_mode(self) -> str:
        """"none" (no tools, or tool_choice none), "auto", "required", or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "JsonObjectFormat",
           "JsonSchemaFormat", "SamplingFields", "StructuredOutputs", "TextPart", "Tool"]

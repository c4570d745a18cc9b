"""Chat messages and tool definitions of the OpenAI API as pydantic models, and the check
that every string of a body is encodable text.

Messages: ``system``/``developer``/``user``/``assistant`` with string or text-part content,
``assistant`` with ``tool_calls`` (its ``arguments`` a JSON object as text, as the SDK
sends it back), and ``tool`` with the result of a call (``tool_call_id``).  Other fields
the SDK echoes back (``refusal``, ``audio``...) are accepted only when null.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def check_text(data: Any) -> None:
    """``ValueError`` naming the top-level field when any string (or key) in ``data``
    holds a lone surrogate: JSON can spell one (``"\\ud800"``) but it is not text, and
    no tokenizer can encode it.  Iterative: any nesting depth."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _surrogate(item):
                raise ValueError(f"{where or 'body'}: text contains a lone surrogate "
                                 "(\\ud800-\\udfff), which is not valid Unicode")
        elif isinstance(item, dict):
            for k, v in item.items():
                name = where or ("body" if isinstance(k, str) and _surrogate(k) else str(k))
                stack.append((name, k))
                stack.append((name, v))
        elif isinstance(item, list):
            stack.extend((where, v) for v in item)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionDef(_Strict):
    """A function the model may call; ``parameters`` its arguments' JSON schema (needed
    when the call is constrained: ``tool_choice`` "required" or naming it)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str

    def argument_object(self) -> dict:
        """The arguments as a JSON object (chat templates render them with ``tojson``)."""
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool_calls: arguments of {self.name!r} are not JSON: {e}") \
                from None
        if not isinstance(value, dict):
            raise ValueError(f"tool_calls: arguments of {self.name!r} must be a JSON object")
        return value


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """One message (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        if extra:
            raise ValueError(f"unsupported message field(s): {', '.join(sorted(extra))}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only tool messages carry one")
        for call in self.tool_calls or ():
            call.function.argument_object()
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it (``developer`` as ``system``; tool calls
        with their arguments as objects)."""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": c.function.argument_object()}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg

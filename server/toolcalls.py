"""Tool calls in the model's own format: the families real chat templates use, each able to
find calls in generated text and to write the grammar that makes the model call.

- ``hermes`` (Hermes, Qwen 2.5/3): each call a block
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, newline between;
- ``llama3_json`` (Llama 3.1-3.3): ``{"name": ..., "parameters": {...}}`` is the whole
  output, parallel calls separated by ``; ``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

``detect_family`` picks one from the chat template's text (``--tool-call-parser``
overrides).  ``grammar`` builds the llguidance Lark grammar of "one or more calls of
these functions, arguments valid against each one's parameter schema" for
``tool_choice`` "required" or a named function; so constrained, every call parses.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from slabserve.server.tooltypes import FunctionDef

FAMILIES = ("hermes", "llama3_json", "mistral")
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text

    def openai(self, index: int | None = None) -> dict:
        """The call in OpenAI's shape (with ``index`` for a streamed delta)."""
        obj: dict = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            obj["index"] = index
        return obj


def detect_family(template: str | None) -> str:
    """The family a chat template's tool format belongs to (hermes when it says nothing)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<tool_call>" in text:
        return "hermes"
    if "<|python_tag|>" in text or "<|start_header_id|>" in text:
        return "llama3_json"
    return "hermes"


def _call(obj: object, arg_keys: tuple[str, ...]) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arg_keys:
        if isinstance(obj.get(key), dict):
            return ParsedCall(obj["name"], json.dumps(obj[key], ensure_ascii=False))
    return None


def call_schema(fn: FunctionDef, arg_key: str) -> dict:
    """JSON schema of one call of ``fn``: its name, and arguments valid against its
    parameter schema."""
    return {"type": "object", "properties": {"name": {"const": fn.name},
                                             arg_key: fn.parameters},
            "required": ["name", arg_key], "additionalProperties": False}


def _any_call(fns: list[FunctionDef], arg_key: str) -> str:
    schemas = [call_schema(f, arg_key) for f in fns]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return json.dumps({**one, **_COMPACT}, ensure_ascii=False)


class Family(ABC):
    """One tool-call format.  ``marker``: text that starts a call (None: a call is the
    whole output, starting with ``{``)."""

    name: str
    marker: str | None

    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(remaining content or None, calls) of a finished output."""

    @abstractmethod
    def grammar(self, fns: list[FunctionDef], parallel: bool) -> str:
        """Lark grammar of one call (or, ``parallel``, one or more) of ``fns``."""

    def call_start(self, text: str) -> int | None:
        """Index in ``text`` where tool-call text begins (None: not seen yet)."""
        i = text.find(self.marker)
        return None if i < 0 else i

    def held(self, text: str) -> int:
        """How many trailing characters might still become the start of a call."""
        for k in range(min(len(text), len(self.marker) - 1), 0, -1):
            if self.marker.startswith(text[-k:]):
                return k
        return 0


class Hermes(Family):
    name, marker = "hermes", "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls, kept, pos = [], [], 0
        for m in self._block.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue
            kept.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        content = ("".join(kept) + text[pos:]).strip()
        return content or None, calls

    def grammar(self, fns: list[FunctionDef], parallel: bool) -> str:
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return (f"{start}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\n"
                f"body: %json {_any_call(fns, 'arguments')}\n")


class Llama3Json(Family):
    name, marker = "llama3_json", None
    _tag = "<|python_tag|>"

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(("{", self._tag)):
            return len(text) - len(stripped)
        return None

    def held(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if not stripped or self._tag.startswith(stripped) else 0

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix(self._tag).strip()
        calls, pos, dec = [], 0, json.JSONDecoder()
        while body.startswith("{", pos):
            try:
                obj, pos = dec.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text.strip() or None, []
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return text.strip() or None, []
            calls.append(call)
            pos = len(body) - len(body[pos:].lstrip().lstrip(";").lstrip())
        if pos != len(body) or not calls:
            return text.strip() or None, []
        return None, calls

    def grammar(self, fns: list[FunctionDef], parallel: bool) -> str:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return f"{start}\ncall: %json {_any_call(fns, 'parameters')}\n"


class Mistral(Family):
    name, marker = "mistral", "[TOOL_CALLS]"

    def __init__(self, marker_token: int | None = None) -> None:
        self.marker_token = marker_token  # the marker's id when it is a special token

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        i = text.find(self.marker)
        if i < 0:
            return text.strip() or None, []
        try:
            items = json.loads(text[i + len(self.marker):])
        except json.JSONDecodeError:
            return text.strip() or None, []
        items = items if isinstance(items, list) else [items]
        calls = [_call(x, ("arguments", "parameters")) for x in items]
        if not calls or None in calls:
            return text.strip() or None, []
        return text[:i].strip() or None, calls

    def grammar(self, fns: list[FunctionDef], parallel: bool) -> str:
        items = json.loads(_any_call(fns, "arguments"))
        items.pop("x-guidance")
        array = {"type": "array", "items": items, "minItems": 1, **_COMPACT}
        if not parallel:
            array["maxItems"] = 1
        head = (f"<[{self.marker_token}]>" if self.marker_token is not None
                else json.dumps(self.marker))
        return f"start: {head} calls\ncalls: %json {json.dumps(array, ensure_ascii=False)}\n"


def family(name: str, tokenizer=None) -> Family:
    """The family called ``name``; ``tokenizer`` tells whether Mistral's marker is one
    special token."""
    if name == "llama3_json":
        return Llama3Json()
    if name == "mistral":
        tid = None
        if tokenizer is not None:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            tid = vocab.get(Mistral.marker)
        return Mistral(tid)
    if name == "hermes":
        return Hermes()
    raise ValueError(f"unknown tool-call parser {name!r}; choose from {', '.join(FAMILIES)}")

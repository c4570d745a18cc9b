"""Tools on one chat request: which family parses the calls, what the chat template is
given, which grammar constrains the output, and the streamed view of the calls.

``tool_choice``: "none" (tools are not rendered and nothing is parsed), "auto" (tools
rendered through the template; calls in the output are parsed, unconstrained), "required"
(one or more calls of any tool; ``parallel_tool_calls: false`` allows one) and a named
function (exactly one call of it).  The last two are constrained by
``toolcalls.Family.grammar`` from the functions' parameter schemas, so they always parse
and validate; such a function without ``parameters`` is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from slabserve.scheduler.api import GrammarSpec
from slabserve.server.errors import bad_request
from slabserve.server.protocol import ChatCompletionRequest
from slabserve.server.toolcalls import Family, ParsedCall, detect_family, family


@dataclass(frozen=True)
class ToolSetup:
    """``family`` None: no tool calls on this request."""

    family: Family | None = None
    template_tools: list[dict] | None = None
    spec: GrammarSpec | None = None

    @property
    def active(self) -> bool:
        return self.family is not None


def tool_setup(body: ChatCompletionRequest, parser: str, tokenizer) -> ToolSetup:
    """The request's tools (400 on a constrained function without a schema).  ``parser``:
    a family name or "auto" (from the chat template)."""
    mode = body.tool_mode
    if mode == "none":
        return ToolSetup()
    if parser == "auto":
        parser = detect_family(getattr(tokenizer, "chat_template", None))
    fam = family(parser, tokenizer)
    rendered = [t.model_dump(exclude_none=True) for t in body.tools]
    if mode == "auto":
        return ToolSetup(fam, rendered)
    named = body.tool_choice.function.name if mode == "named" else None
    fns = []
    for i, tool in enumerate(body.tools):
        if named is not None and tool.function.name != named:
            continue
        if tool.function.parameters is None:
            param = f"tools.{i}.function.parameters"
            raise bad_request(f"{param}: tool_choice {mode!r} constrains the call by its "
                              "parameter schema; this function has none", param)
        fns.append(tool.function)
    parallel = mode == "required" and body.parallel_tool_calls is not False
    return ToolSetup(fam, rendered, GrammarSpec("lark", fam.grammar(fns, parallel)))


def finish_reason(reason: str | None, calls: list[ParsedCall]) -> str | None:
    """``tool_calls`` for an output that ended normally with calls."""
    return "tool_calls" if calls and reason == "stop" else reason


class ToolStream:
    """One streamed choice: content deltas until a call may have begun (text that could
    still be a call's start is held back), then, at the end, the calls (or, when they do
    not parse, the held text as content)."""

    def __init__(self, fam: Family) -> None:
        self.family = fam
        self.text = ""
        self.sent = 0
        self.start: int | None = None

    def feed(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        """(content to send now, calls) after ``text``; calls come only when ``final``."""
        self.text += text
        if self.start is None:
            self.start = self.family.call_start(self.text)
        if self.start is not None:
            limit = self.start
        else:
            limit = len(self.text) - (0 if final else self.family.held(self.text))
        out = self.text[self.sent:max(limit, self.sent)]
        self.sent = max(limit, self.sent)
        if not final or self.start is None:
            return out, []
        content, calls = self.family.parse(self.text[self.start:])
        if not calls:
            return out + self.text[self.start:], []
        return out + (content or ""), calls

"""Structured outputs: the request fields that constrain a completion, as one
``GrammarSpec`` for the engine.

Sources (at most one per request, else 400): ``response_format`` (``json_object``: any
JSON object; ``json_schema``: its ``schema``), and vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) or its older
``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.  Grammars are
llguidance's Lark dialect (EBNF-like; ``start`` is the top rule).  A spec the engine
cannot compile is a 400 naming the field and giving the engine's reason.
"""

from __future__ import annotations

import json
from typing import Any

from slabserve.scheduler.api import GrammarSpec, RequestError
from slabserve.server.errors import bad_request
from slabserve.server.protocol import JsonObjectFormat, JsonSchemaFormat, SamplingFields

ANY_OBJECT = '{"type": "object"}'


def schema_spec(schema: dict[str, Any] | str | None, param: str) -> GrammarSpec:
    """A JSON-schema spec from a schema object or its JSON text (None: any object)."""
    if schema is None:
        return GrammarSpec("json_schema", ANY_OBJECT)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param}: not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise bad_request(f"{param}: a JSON schema must be an object", param)
    return GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False))


def _vllm_fields(req: SamplingFields) -> list[tuple[str, str, Any]]:
    """(param, kind, value) of every vLLM constraint field set on ``req``."""
    fields: list[tuple[str, str, Any]] = []
    so = req.structured_outputs
    if so is not None:
        fields += [("structured_outputs.json", "json", so.json_),
                   ("structured_outputs.regex", "regex", so.regex),
                   ("structured_outputs.choice", "choice", so.choice),
                   ("structured_outputs.grammar", "grammar", so.grammar),
                   ("structured_outputs.json_object", "json_object", so.json_object or None)]
    fields += [("guided_json", "json", req.guided_json),
               ("guided_regex", "regex", req.guided_regex),
               ("guided_choice", "choice", req.guided_choice),
               ("guided_grammar", "grammar", req.guided_grammar)]
    return [f for f in fields if f[2] is not None]


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return schema_spec(value, param)
    if kind == "regex":
        return GrammarSpec("regex", value)
    if kind == "choice":
        return GrammarSpec("choice", json.dumps(value, ensure_ascii=False))
    if kind == "grammar":
        return GrammarSpec("lark", value)
    return GrammarSpec("json_schema", ANY_OBJECT)


def requested_spec(req: SamplingFields) -> tuple[GrammarSpec, str] | None:
    """(spec, the field it came from) of a request, or None when unconstrained."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = req.response_format
    if isinstance(rf, JsonObjectFormat):
        found.append(("response_format", GrammarSpec("json_schema", ANY_OBJECT)))
    elif isinstance(rf, JsonSchemaFormat):
        found.append(("response_format", schema_spec(rf.json_schema.json_schema,
                                                     "response_format")))
    found += [(param, _spec(kind, value, param)) for param, kind, value in _vllm_fields(req)]
    if len(found) > 1:
        names = ", ".join(p for p, _ in found)
        raise bad_request(f"{found[1][0]}: only one output constraint per request "
                          f"(got {names})", found[1][0])
    if not found:
        return None
    param, spec = found[0]
    return spec, param


async def check(serving, spec: GrammarSpec, param: str) -> None:
    """400 with the engine's reason unless ``spec`` compiles (the compiled grammar is
    cached for the request that follows)."""
    try:
        await serving.check_constraint(spec)
    except RequestError as e:
        raise bad_request(f"{param}: the grammar engine cannot compile it: {e.message}",
                          param) from None

"""Grammar-constrained sampling in the engine (engine.grammar, engine.constraint, the
executor's masks): every constrained output matches its grammar within max_tokens, the
mask leaves other rows alone, seeds reproduce alone, batched and across preemption."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from slabserve import env
from slabserve.build import ServeConfig, build_serving
from slabserve.engine.config import CacheConfig
from slabserve.engine.embedded import ensure_model
from slabserve.engine.grammar import GrammarCompiler, closing_path
from slabserve.engine.sampling import RowSpec, sample
from slabserve.scheduler.api import GrammarSpec, Request, SamplingParams
from slabserve.scheduler.config import SchedulerConfig

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                   "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "ok": {"type": "boolean"}},
     "required": ["point", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 5, "maximum": 900},
     "minItems": 2, "maxItems": 4},
    {"type": "object"},
]


def spec(schema) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(schema))


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    _, tok = load(str(ensure_model("tiny", cache_dir=env.cache_dir())))
    return GrammarCompiler(tok, 259, tok.eos_token_ids)


def test_closing_path_completes_every_schema(compiler):
    for schema in SCHEMAS:
        m = compiler.matcher(spec(schema))
        path = closing_path(m, 200, compiler.closers, frozenset(compiler.eos_ids))
        assert path is not None and m.is_accepting()
        jsonschema.validate(json.loads(compiler.tokenizer.decode_str(path)), schema)


def test_specs_that_do_not_compile_say_why(compiler):
    bad = [(spec({"type": "strange"}), "strange"), (GrammarSpec("regex", "[a-"), "unclosed"),
           (GrammarSpec("lark", "start: nothing_here"), "nothing_here"),
           (GrammarSpec("json_schema", "{not json"), "JSON"),
           (spec({"properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere")]
    for s, reason in bad:
        with pytest.raises(ValueError, match=reason):
            compiler.matcher(s)
    compiler.matcher(GrammarSpec("choice", json.dumps(['say "hi"', "back\\slash", "é"])))


def test_mask_leaves_unconstrained_rows_untouched():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(3, 50)).astype(np.float32) * 4)
    specs = [RowSpec(SamplingParams(temperature=0.8, seed=s, logprobs=3), s, (), (), 0)
             for s in (1, 2, 3)]
    allowed = np.ones((3, 50), dtype=bool)
    allowed[1] = False
    allowed[1, [7, 9]] = True
    free = sample(logits, specs)
    masked = sample(logits, specs, mx.array(allowed))
    assert masked[0] == free[0] and masked[2] == free[2]  # tokens and logprobs alike
    assert masked[1][0] in (7, 9)
    assert {t for t, _ in masked[1][1].top[:2]} == {7, 9}
    assert masked == sample(logits, specs, mx.array(allowed))  # seeded: reproducible


async def started(cache: CacheConfig | None = None):
    eng = build_serving(ServeConfig(
        cache=cache or CacheConfig(block_size=16, slab_tokens=256, kv_budget_bytes=1 << 22),
        scheduler=SchedulerConfig(max_step_tokens=96, prefill_chunk=32),
        mlx_cache_limit_bytes=1 << 28))
    await eng.start()
    return eng


async def run(eng, rid: str, prompt: tuple[int, ...], params: SamplingParams):
    if params.constraint is not None:
        await eng.check_constraint(params.constraint)
    out, last = [], None
    async for d in eng.generate(Request(rid, prompt, params)):
        out += d.token_ids
        last = d
    return out, last.finish_reason


def constrained(schema, seed: int, max_tokens: int = 80, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                          constraint=spec(schema), **kw)


async def test_every_output_validates_and_batched_equals_alone():
    eng = await started()
    tok = eng.tokenizer
    try:
        jobs = [(f"r{i}-{seed}", schema, seed) for i, schema in enumerate(SCHEMAS)
                for seed in range(6)]
        prompt = tuple(tok.encode("Answer in JSON:"))
        batched = await asyncio.gather(*[run(eng, rid, prompt, constrained(s, seed))
                                         for rid, s, seed in jobs])
        for (rid, schema, _), (ids, reason) in zip(jobs, batched, strict=True):
            assert reason == "stop", (rid, tok.decode(ids))
            jsonschema.validate(json.loads(tok.decode(ids)), schema)
        alone = [await run(eng, f"alone{k}", prompt, constrained(s, seed))
                 for k, (_, s, seed) in enumerate(jobs[:4])]
        assert alone == batched[:4]
        assert eng.executor.constraints is not None and len(eng.executor.constraints) == 0
    finally:
        await eng.shutdown(5)


async def test_unconstrained_rows_in_a_constrained_batch_are_unchanged():
    eng = await started()
    tok = eng.tokenizer
    free = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    try:
        prompt = tuple(tok.encode("Once upon"))
        alone = await run(eng, "alone", prompt, free)
        mixed = await asyncio.gather(
            run(eng, "free", prompt, free),
            *[run(eng, f"c{i}", prompt, constrained(SCHEMAS[0], i)) for i in range(4)])
        assert mixed[0] == alone
    finally:
        await eng.shutdown(5)


async def test_grammar_state_survives_preemption():
    prompts = [tuple(range(40 + i, 70 + i)) for i in range(6)]
    params = [constrained(SCHEMAS[i % 2], seed=i, max_tokens=60) for i in range(6)]
    eng = await started()
    try:
        alone = [await run(eng, f"a{i}", p, sp)
                 for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    finally:
        await eng.shutdown(5)
    # 8 blocks of 16 tokens: one request fits, six do not
    eng = await started(CacheConfig(block_size=16, slab_tokens=32, kv_budget_bytes=8 * 16 * 2048))
    try:
        batched = await asyncio.gather(*[run(eng, f"b{i}", p, sp) for i, (p, sp) in
                                         enumerate(zip(prompts, params, strict=True))])
        assert eng.stats().preemptions > 0, "the budget was meant to force preemption"
        assert batched == alone
        for (ids, reason), sp in zip(batched, params, strict=True):
            assert reason == "stop"
            jsonschema.validate(json.loads(eng.tokenizer.decode(ids)),
                                json.loads(sp.constraint.source))
    finally:
        await eng.shutdown(5)


async def test_budget_forces_completion_and_truncation_says_length(compiler):
    eng = await started()
    tok = eng.tokenizer
    prompt = tuple(tok.encode("JSON:"))
    try:
        for schema in SCHEMAS[:3]:  # max_tokens = the closing path's length from the start
            m = compiler.matcher(spec(schema))
            path = closing_path(m, 100, compiler.closers, frozenset(compiler.eos_ids))
            tight = len(path) + (0 if m.is_stopped() else 1)
            outs = await asyncio.gather(*[run(eng, f"t{s}", prompt,
                                              constrained(schema, s, max_tokens=tight))
                                          for s in range(6)])
            for ids, reason in outs:
                assert reason == "stop" and len(ids) <= tight
                jsonschema.validate(json.loads(tok.decode(ids)), schema)
        ids, reason = await run(eng, "short", prompt, constrained(SCHEMAS[0], 0, max_tokens=10))
        assert reason == "length" and len(ids) == 10
        assert tok.decode(ids).startswith('{"name":"')
        regex = SamplingParams(max_tokens=30, seed=3, constraint=GrammarSpec(
            "regex", r"[a-z]{2,40}@example\.(com|org)"))
        ids, reason = await run(eng, "regex", prompt, regex)
        assert reason == "stop" and len(ids) <= 30
        assert tok.decode(ids).split("@")[1] in ("example.com", "example.org")
    finally:
        await eng.shutdown(5)


def test_token_ids_past_the_tokenizer_are_never_allowed(compiler):
    wide = GrammarCompiler(compiler._hf, 300, compiler.eos_ids)
    m = wide.matcher(GrammarSpec("regex", "[a-z]+"))
    bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
    assert bits[259:].sum() == 0 and bits[:259].sum() == 26


def test_closing_path_gets_out_of_patterns_that_repeat(compiler):
    eos = frozenset(compiler.eos_ids)
    for grammar, text in ((GrammarSpec("regex", "(ab)+c"), "abc"),
                          (GrammarSpec("lark", 'start: /[0-9]+/ "x"'), "111x")):
        path = closing_path(compiler.matcher(grammar), 50, compiler.closers, eos)
        assert compiler.tokenizer.decode_str(path) == text

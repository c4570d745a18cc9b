"""Grammars for constrained sampling, on llguidance: a ``GrammarSpec`` compiled against the
served tokenizer, and the shortest-way-out path a matcher takes to finish in time.

``GrammarCompiler`` owns the llguidance tokenizer (built once, lazily: the vocabulary is
walked into a token trie) and a bounded cache of compiled matchers by spec; requests
start from a ``deep_copy`` of the cached one, so a schema compiles once however many
requests use it.  Thread-safe: the server checks specs from worker threads while the
engine thread copies matchers.

JSON is compiled compact (``whitespace_flexible`` off: no whitespace between tokens), so
an output cannot grow without bound in whitespace, and it parses either way.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
from llguidance import LLMatcher, LLTokenizer

from slabserve.engine.step import GrammarSpec

JSON_OPTIONS = {"whitespace_flexible": False}
# What a closing path tries first, in order: the quote (ends a string; elsewhere it starts
# the shortest string), closers, the separators a required property or item needs, then
# the shortest values, then openers (only when nothing else is allowed).  A closer before
# a digit: a path never extends a number or a string it could end.  Past these, the lowest
# allowed id (on byte-level and BPE vocabularies alike, punctuation before letters).
CLOSING_CHARS = ('"', "}", "]", ",", ":", "1", "0", " ", "\n", "{", "[")
REPEATS = 3  # a token taken this many times in a row: the preferred ones are looping
LOOKAHEAD = 64  # allowed tokens tried for one that ends the grammar at once


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of ``spec``; ``ValueError`` when its source is malformed
    (the grammar itself is checked when compiled)."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as e:
            raise ValueError(f"the schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("the schema must be a JSON object")
        return LLMatcher.grammar_from_json_schema(
            {} if schema is True else schema, defaults=dict(JSON_OPTIONS))
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice needs at least one non-empty string")
        # Lark string literals take JSON's escapes
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return LLMatcher.grammar_from_lark(spec.source)


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer (or an mlx-lm wrapper of one),
    with ``vocab_size`` the model's logits width (ids past the tokenizer's are never
    allowed) and ``eos_ids`` the ids that end a request."""
    from llguidance.hf import from_tokenizer

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    n = max(vocab_size, len(hf))
    return from_tokenizer(hf, n_vocab=n, eos_token=sorted(eos_ids))


class GrammarCompiler:
    """Compiles specs into matchers (see the module docstring).  ``cache_size`` bounds the
    compiled matchers kept; ``tokenizer`` builds lazily on the first compile."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int],
                 cache_size: int = 64) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = tuple(sorted(eos_ids))
        self.cache_size = cache_size
        self._llt: LLTokenizer | None = None
        self._closers: tuple[int, ...] = ()
        self._cache: OrderedDict[GrammarSpec, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._llt is None:
                self._llt = llg_tokenizer(self._hf, self.vocab_size, self.eos_ids)
                self._closers = single_tokens(self._llt, CLOSING_CHARS)
            return self._llt

    @property
    def closers(self) -> tuple[int, ...]:
        """Token ids of ``CLOSING_CHARS`` that are one token each, in that order."""
        _ = self.tokenizer
        return self._closers

    def matcher(self, spec: GrammarSpec) -> LLMatcher:
        """A fresh matcher for ``spec`` at its start; ``ValueError`` with llguidance's
        reason when the spec does not compile."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit.deep_copy()
        llt = self.tokenizer
        try:
            text = grammar_text(spec)
            err = LLMatcher.validate_grammar(text, llt)
            m = None if err else LLMatcher(llt, text, log_level=0)  # drops the GIL
        except (ValueError, TypeError, RuntimeError) as e:  # malformed input, not a bug
            raise ValueError(str(e) or type(e).__name__) from None
        if err:
            raise ValueError(err.strip())
        if m.is_error():
            raise ValueError(m.get_error())
        with self._lock:
            self._cache[spec] = m
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return m.deep_copy()


def single_tokens(llt: LLTokenizer, chars: Sequence[str]) -> tuple[int, ...]:
    out = []
    for ch in chars:
        ids = llt.tokenize_str(ch)
        if len(ids) == 1:
            out.append(ids[0])
    return tuple(out)


def allowed_ids(m: LLMatcher, skip: frozenset[int]) -> list[int]:
    """The token ids the matcher allows next, lowest first, ``skip`` excepted."""
    bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8),
                         bitorder="little")
    return [t for t in np.flatnonzero(bits).tolist() if t not in skip]


def fallback_token(m: LLMatcher, skip: frozenset[int], avoid: Sequence[int]) -> int | None:
    """When no preferred token serves: an allowed token after which the grammar accepts
    (among the lowest ``LOOKAHEAD`` ids), else the lowest allowed id not in ``avoid``, else
    the lowest (None: nothing is allowed)."""
    ids = allowed_ids(m, skip)
    for t in ids[:LOOKAHEAD]:
        probe = m.deep_copy()
        if probe.consume_token(t) and probe.is_accepting():
            return t
    fresh = [t for t in ids if t not in avoid]
    return (fresh or ids or [None])[0]


def closing_path(m: LLMatcher, limit: int, closers: Sequence[int],
                 eos: frozenset[int]) -> list[int] | None:
    """Tokens that take ``m`` (consumed: pass a copy) to an accepting state, found
    greedily: forced tokens, else the first of ``closers`` allowed, else
    ``fallback_token`` (also when the path took one token ``REPEATS`` times in a row: a
    loop).  None when that takes more than ``limit`` tokens or gets stuck.

    Invariant relied on by ``engine.constraint``: the path is a function of the matcher
    state, so after consuming its first token the path from the new state is the rest."""
    path: list[int] = []
    while not m.is_accepting():
        if len(path) >= limit or m.is_error():
            return None
        forced = m.compute_ff_tokens()
        if forced:
            n = m.try_consume_tokens(forced[: limit - len(path)])
            if n == 0:
                return None
            path.extend(forced[:n])
            continue
        recent = path[-REPEATS:]
        looping = len(recent) == REPEATS and len(set(recent)) == 1
        t = None if looping else next(
            (c for c in closers if m.try_consume_tokens([c]) == 1), None)
        if t is None:
            t = fallback_token(m, eos, recent)
            if t is None or not m.consume_token(t):
                return None
        path.append(t)
    return path


__all__ = ["GrammarCompiler", "allowed_ids", "closing_path", "fallback_token",
           "grammar_text", "llg_tokenizer"]

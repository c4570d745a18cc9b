"""The tokenizer as the server uses it: prompts to token ids, chat messages through the
chat template, token ids to text (whole outputs and single tokens for logprobs).

Wraps an mlx-lm ``TokenizerWrapper`` or any Hugging Face-like tokenizer with ``encode``,
``decode`` and ``apply_chat_template``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

MIN_LOGPROB = -9999.0  # what OpenAI reports for a token of (practically) zero probability


def finite_logprob(value: float) -> float:
    """A logprob JSON can carry, in [MIN_LOGPROB, 0]: -inf and NaN (a degenerate
    distribution, e.g. from extreme penalties) become ``MIN_LOGPROB``."""
    if not math.isfinite(value):
        return MIN_LOGPROB
    return min(max(value, MIN_LOGPROB), 0.0)


class TextCodec:
    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids))

    def _token_text(self, token_id: int) -> str:
        """The text of one token on its own (a partial UTF-8 character decodes to U+FFFD)."""
        return self.tokenizer.decode([token_id])

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` (and ``tools``, OpenAI's tool objects, when given)
        through the tokenizer's chat template.  The template places any BOS itself, so the
        text is encoded without special tokens."""
        kw = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
        )
        if not isinstance(text, str):  # some wrappers return token ids regardless
            return [int(t) for t in text]
        return self.encode(text, add_special_tokens=False)

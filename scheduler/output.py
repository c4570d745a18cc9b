"""Per-request output: streaming detokenization and stop strings, turning sampled tokens
into ``Delta``s.  Pure Python (the tokenizer is mlx-lm's ``TokenizerWrapper``)."""

from __future__ import annotations

from slabserve.engine.step import SampledToken
from slabserve.scheduler.api import Delta, FinishReason, SamplingParams


class _NoText:
    """Detokenizer stand-in when the engine runs without a tokenizer (tests)."""

    last_segment = ""

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...


class OutputStream:
    """Turns one request's tokens into deltas.

    Stop strings are matched on the detokenized text, across token boundaries: text
    that could still be the start of a stop string is held back until it cannot, and a
    matched stop string (and anything after it) is never emitted.  A token that ends
    the request by id (eos, ``stop_token_ids``) is counted in ``token_ids`` but adds no
    text; one that completes the request's grammar (``SampledToken.final``) does."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, detokenizer=None) -> None:
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.detok = detokenizer if detokenizer is not None else _NoText()
        self.generated = 0
        self.cached_tokens = 0
        self.finished = False
        self._held = ""

    def push(self, tok: SampledToken, finish: FinishReason | None,
             cached_tokens: int = 0) -> tuple[Delta, bool]:
        """Delta for one new token; the bool is True when a stop string ended the
        request here (the caller must then finish it in the scheduler).
        ``cached_tokens``: prompt tokens the prefix cache supplied."""
        self.generated += 1
        self.cached_tokens = cached_tokens
        if finish != "stop" or tok.final:  # a final token completes a grammar: it is text
            self.detok.add_token(tok.token_id)
        if finish is not None:
            self.detok.finalize()
        text, hit = self._emit(self.detok.last_segment, final=finish is not None)
        if hit:
            finish = "stop"
        self.finished = finish is not None
        logprobs = (tok.logprob,) if tok.logprob is not None else None
        delta = Delta((tok.token_id,), text, logprobs, finish, self.prompt_tokens, self.generated,
                      None, self.cached_tokens)
        return delta, hit

    def close(self, reason: FinishReason, error: str | None = None) -> Delta:
        """The last delta of a request ended from outside (abort, error): held text is
        dropped when aborting, as it may be part of a stop string."""
        self.finished = True
        return Delta((), "", None, reason, self.prompt_tokens, self.generated, error,
                     self.cached_tokens)

    def _emit(self, new: str, final: bool) -> tuple[str, bool]:
        buf = self._held + new
        stops = self.params.stop
        if stops:
            hits = [(buf.find(s), s) for s in stops if s and s in buf]
            if hits:
                self._held = ""
                return buf[: min(h for h, _ in hits)], True
        if final or not stops:
            self._held = ""
            return buf, False
        keep = _partial_suffix(buf, stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False


def _partial_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = min(len(text), max(len(s) for s in stops) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0

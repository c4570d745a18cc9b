"""OpenAI request fields -> the scheduler's ``SamplingParams``, with the checks that need the
model: token ids inside the vocabulary, prompt and ``max_tokens`` inside the context."""

from __future__ import annotations

from dataclasses import replace

from slabserve.scheduler.api import SamplingParams
from slabserve.server.errors import bad_request
from slabserve.server.protocol import SamplingFields


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary "
                          f"[0, {vocab_size})", param)


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    out = []
    for key, bias in raw.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"logit_bias: key {key!r} is not a token id",
                              "logit_bias") from None
        check_token_ids([tid], vocab_size, "logit_bias")
        out.append((tid, float(bias)))
    return tuple(sorted(out))


def base_params(req: SamplingFields, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """Sampling params of one request, ``max_tokens`` still at its default (set per prompt
    by ``bound_max_tokens``).  A value the serving loop refuses becomes a 400."""
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
    top_k = req.top_k or 0
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(top_k, 0),
            min_p=req.min_p or 0.0,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=_logit_bias(req.logit_bias, vocab_size),
            stop=req.stop_list,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


def bound_max_tokens(
    params: SamplingParams, prompt_len: int, requested: int | None, default: int | None,
    max_context: int,
) -> SamplingParams:
    """Params with ``max_tokens`` set: the requested value if prompt + max_tokens fits the
    context (else 400), without one ``default`` capped by the room left (None = all of it).
    A prompt that leaves no room for one token is a 400 ``context_length_exceeded``."""
    room = max_context - prompt_len
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens; the prompt has "
            f"{prompt_len} tokens, which leaves no room for output.",
            "prompt", "context_length_exceeded")
    if requested is not None:
        if requested > room:
            raise bad_request(
                f"This model's maximum context length is {max_context} tokens; you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                f"for the output).", "max_tokens", "context_length_exceeded")
        return replace(params, max_tokens=requested)
    return replace(params, max_tokens=room if default is None else min(default, room))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index`` of ``n``: with a seed, seed + index, so choices differ but the
    request as a whole stays reproducible."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=params.seed + index)

"""Regressions for issues the reliability run found: SSE events split by line-separator
characters, a top_p that underflows float32, and idle integrity checks counted."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from test_engine import collect, started, wait_idle
from test_sampling import logits, spec

from slabserve.engine.sampling import sample
from slabserve.scheduler.api import SamplingParams
from slabserve.server.generation import sse


def test_sse_event_is_one_line_with_unicode_line_separators():
    text = "a\u2028b\u2029c\x85d\u00e9"
    event = sse({"text": text})
    body = event[len("data: "):-2]
    assert event.endswith("\n\n") and len(body.splitlines()) == 1
    assert json.loads(body)["text"] == text
    assert "\u00e9" in body  # other text stays raw UTF-8


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-9])
def test_vanishing_top_p_keeps_only_the_best_token(top_p):
    lg = logits(4, seed=3)
    specs = [spec(seed=s, top_p=top_p) for s in range(4)]
    for _ in range(5):
        toks = [t for t, _ in sample(mx.array(lg), specs)]
        assert toks == lg.argmax(-1).tolist()
    assert np.isfinite(lg).all()


async def test_idle_integrity_checks_are_counted_and_a_failure_is_not_fatal():
    eng = await started()
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        first = await collect(eng, "a", (1, 2, 3), greedy)
        await wait_idle(eng)
        s = eng.stats()
        assert s.integrity_checks >= 1 and s.integrity_failures == 0
        # corrupt the accounting: a used block that nobody references
        eng.scheduler.allocator.allocate(1)
        assert await collect(eng, "b", (1, 2, 3), greedy) == first  # still serving
        await wait_idle(eng)
        assert eng.stats().integrity_failures >= 1
    finally:
        await eng.shutdown(5)


async def test_clients_split_sse_on_newlines_only():
    """loadtest and reliability read streams through one reader that does not split an
    event on U+2028 / U+2029 / U+0085 (httpx's aiter_lines does)."""
    import httpx

    from slabserve.loadtest.sse import sse_lines

    raw = 'data: {"t":"a\u2028b\u2029c\x85d"}\r\n\r\ndata: [DONE]\n\n'.encode()
    resp = httpx.Response(200, content=raw)
    lines = [line async for line in sse_lines(resp)]
    assert lines == ['data: {"t":"a\u2028b\u2029c\x85d"}', "", "data: [DONE]", ""]
    assert json.loads(lines[0][6:])["t"] == "a\u2028b\u2029c\x85d"

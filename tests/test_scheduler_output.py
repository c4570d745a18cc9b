"""OutputStream: streaming text, stop strings across token boundaries, finish reasons."""

from __future__ import annotations

import pytest

from slabserve.engine.step import SampledToken
from slabserve.scheduler.api import SamplingParams
from slabserve.scheduler.output import OutputStream

PIECES = {1: "he", 2: "llo", 3: " wo", 4: "rld", 5: "!", 6: "<eos>"}


class PieceDetok:
    """Each token id is a fixed text piece (like a BPE detokenizer with whole pieces)."""

    def __init__(self) -> None:
        self.text, self.offset = "", 0

    def add_token(self, t: int) -> None:
        self.text += PIECES[t]

    def finalize(self) -> None: ...

    @property
    def last_segment(self) -> str:
        seg, self.offset = self.text[self.offset :], len(self.text)
        return seg


def run(tokens, stop=(), finish_last=None):
    out = OutputStream(SamplingParams(stop=tuple(stop)), prompt_tokens=3, detokenizer=PieceDetok())
    deltas = []
    for i, t in enumerate(tokens):
        fin = finish_last if i == len(tokens) - 1 else None
        d, hit = out.push(SampledToken(t), fin)
        deltas.append((d, hit))
        if d.finish_reason:
            break
    return deltas


def text(deltas):
    return "".join(d.text for d, _ in deltas)


def test_plain_stream_concatenates():
    ds = run([1, 2, 3, 4], finish_last="length")
    assert text(ds) == "hello world" and ds[-1][0].finish_reason == "length"
    assert [d.generated_tokens for d, _ in ds] == [1, 2, 3, 4]
    assert all(d.prompt_tokens == 3 for d, _ in ds)


@pytest.mark.parametrize("stop,want", [
    ("lo w", "hel"),       # spans three tokens
    ("o", "hell"),
    ("world", "hello "),
    ("rld!", "hello wo"),
])
def test_stop_string_across_tokens_is_cut_and_not_emitted(stop, want):
    ds = run([1, 2, 3, 4, 5], stop=[stop])
    assert text(ds) == want
    assert ds[-1][1] is True and ds[-1][0].finish_reason == "stop"


def test_held_text_is_released_when_it_cannot_be_a_stop():
    ds = run([1, 2, 3], stop=["lox"])
    assert [d.text for d, _ in ds] == ["he", "l", "lo wo"]
    ds = run([1, 2], stop=["lox"], finish_last="length")
    assert text(ds) == "hello"


def test_eos_adds_no_text_but_counts():
    ds = run([1, 6], finish_last="stop")
    assert text(ds) == "he" and ds[-1][0].token_ids == (6,)
    assert ds[-1][0].generated_tokens == 2 and ds[-1][1] is False


def test_close_drops_held_text_on_abort():
    out = OutputStream(SamplingParams(stop=("lo!",)), 3, PieceDetok())
    d, _ = out.push(SampledToken(1), None)
    d2, _ = out.push(SampledToken(2), None)
    last = out.close("abort")
    assert d.text + d2.text == "hel" and last.finish_reason == "abort" and last.text == ""

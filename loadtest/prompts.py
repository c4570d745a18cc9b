"""Prompts of an exact token length, measured with the model's own tokenizer.

Every prompt starts with a letter that cycles with the request index (so any 52 consecutive
prompts differ in their first token), then random hex, the index and random words: servers
with prompt caches (mlx_lm.server keeps an LRU of 10 KV caches and reuses even a one-token
common prefix) get no hits, and TTFT measures real prefill.  A tokenizer that prepends BOS
would share that one token; the embedded models' tokenizer has no BOS.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be are this "
    "river market signal window garden engine paper silver morning planet harbor letter "
    "forest number theory castle winter bridge mirror village cloud stone metal story light "
    "measure travel quiet yellow simple careful distant gentle rapid narrow ancient hollow"
).split()


@dataclass(frozen=True)
class Tokenizer:
    """encode/decode pair; ``name`` says where it came from (for reports)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    name: str


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of an mlx-lm / Hugging Face model directory: ``tokenizer.json`` through
    ``tokenizers`` when present, else transformers' AutoTokenizer.  No special tokens added."""
    tok_file = Path(model_dir) / "tokenizer.json"
    if tok_file.exists():
        from tokenizers import Tokenizer as HFTokenizer

        t = HFTokenizer.from_file(str(tok_file))
        return Tokenizer(lambda s: t.encode(s, add_special_tokens=False).ids,
                         lambda ids: t.decode(ids, skip_special_tokens=False),
                         f"tokenizers:{tok_file}")
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(model_dir))
    return Tokenizer(lambda s: at.encode(s, add_special_tokens=False),
                     lambda ids: at.decode(ids), f"transformers:{model_dir}")


def _chunk_ids(s: str) -> list[int]:
    return [int.from_bytes(s[i:i + 4].encode("utf-32-le"), "little")
            for i in range(0, len(s), 4)]


def _chunk_text(ids: list[int]) -> str:
    return "".join(i.to_bytes(16, "little").decode("utf-32-le").rstrip("\x00") for i in ids)


def char_tokenizer() -> Tokenizer:
    """Fallback when no tokenizer is known: one "token" per 4 characters (an estimate of
    real tokenizers; the server's reported usage gives the true count)."""
    return Tokenizer(_chunk_ids, _chunk_text, "estimate:4-chars-per-token")


def eos_token_ids(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from ``config.json`` (int or list) and ``generation_config.json``."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            raw = json.loads(path.read_text()).get("eos_token_id")
            ids.update([raw] if isinstance(raw, int) else raw or [])
    return tuple(sorted(ids))


def make_prompt(tok: Tokenizer, n_tokens: int, index: int, seed: int = 0) -> str:
    """Text that ``tok`` encodes to exactly ``n_tokens`` tokens (or as close as the
    tokenizer's merges across the cut allow: never more), unique per ``index``."""
    if n_tokens < 1:
        raise ValueError("n_tokens must be >= 1")
    rng = random.Random(seed * 1_000_003 + index)
    text = f"{string.ascii_letters[index % 52]}{rng.getrandbits(32):08x} request {index}: "
    ids = tok.encode(text)
    while len(ids) < n_tokens + 8:
        need = n_tokens + 8 - len(ids)
        text += " ".join(rng.choice(WORDS) for _ in range(need)) + " "
        ids = tok.encode(text)
    cut = n_tokens
    while cut > 0:
        candidate = tok.decode(ids[:cut])
        got = len(tok.encode(candidate))
        if got <= n_tokens:
            return candidate
        cut -= got - n_tokens
    raise ValueError(f"could not build a {n_tokens}-token prompt")

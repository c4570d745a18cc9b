"""``slabserve calibrate``: time the decode-attention paths on this device for a model's
geometry and save them in the device's profile (``SLABSERVE_CACHE_DIR``/profiles), which
every later ``slabserve serve`` loads into its selector (docs/adr/0002-selector-rules.md)."""

from __future__ import annotations

import argparse
import json

import mlx.core as mx

from slabserve import env
from slabserve.attention.calibrate import calibrate_geometry, merge_and_save
from slabserve.attention.profile import profile_path
from slabserve.attention.selector_rules import current_backend
from slabserve.engine.loader import resolve_model_path


def model_geometry(model: str | None, dtype: str | None) -> tuple[int, int, int, str]:
    """(q_heads, kv_heads, head_dim, dtype) from a model directory's config.json."""
    path = resolve_model_path(model, cache_dir=env.cache_dir())
    cfg = json.loads((path / "config.json").read_text())
    hq = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // hq
    dt = dtype or cfg.get("torch_dtype") or "float16"
    return hq, cfg.get("num_key_value_heads", hq), head_dim, str(dt)


def main(argv: list[str]) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="slabserve calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded:NAME or a model dir (default tiny)")
    p.add_argument("--geometry", default=None, help="q/kv/head_dim instead of --model")
    p.add_argument("--dtype", default=None, help="K/V dtype (default: the model's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batches", type=ints, default=[1, 4, 8, 16])
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384])
    p.add_argument("--slabs", default="one,many")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=None, help="skip batch x ctx above")
    p.add_argument("--short", action="store_true", help="the small start-up grid")
    a = p.parse_args(argv)
    if a.geometry:
        hq, kv, hd = (int(x) for x in a.geometry.split("/"))
        dtype = a.dtype or "float16"
    else:
        hq, kv, hd, dtype = model_geometry(a.model, a.dtype)
    if current_backend() == "cpu":
        mx.set_cache_limit(8 << 30)
    entries = calibrate_geometry(hq, kv, hd, dtype, block_size=a.block_size,
                                 batches=a.batches, contexts=a.contexts,
                                 slabs=a.slabs.split(","), layers=a.layers, reps=a.reps,
                                 short=a.short, max_tokens=a.max_tokens)
    merge_and_save(env.cache_dir(), entries)
    print("wrote", profile_path(env.cache_dir()))
    return 0

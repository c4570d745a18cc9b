"""Greedy generation through the paged runner with each decode path forced is token-exact
with mlx-lm's own generation (float32, the embedded tiny model), and the selector's
counters show that the forced path did every decode layer-step."""

import random

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from slabserve import env
from slabserve.attention.selector import Selector
from slabserve.engine.config import CacheConfig
from slabserve.engine.embedded import ensure_model
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    model, _ = load(str(ensure_model("tiny", cache_dir=env.cache_dir())))
    rng = random.Random(4)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 40, 23)]
    refs = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS)]
            for p in prompts]
    assert all(len(set(r)) > 3 for r in refs), "degenerate output makes the test weak"
    return model, prompts, refs


@pytest.mark.parametrize("force,label", [(True, ("native", "env_native")),
                                         (False, ("gather", "env_gather"))])
def test_forced_path_is_token_exact_with_mlx_lm(tiny, force, label):
    model, prompts, refs = tiny
    # 16-token slabs: every sequence spans several slabs
    sel = Selector(override=force)
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=16,
                                            kv_budget_bytes=1 << 24), selector=sel)
    got = greedy_generate(runner, prompts, MAX_TOKENS, chunk=16)
    assert got == refs
    layers = len(model.layers)
    assert sel.path_counts() == {label: layers * (MAX_TOKENS - 1)}
    # a miss per layer for each new cache key (the pool grows by slabs as tokens come)
    assert sel.misses % layers == 0 and sel.hits > 2 * sel.misses
    assert runner.pool.num_slabs > 3

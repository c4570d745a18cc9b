"""Compiled decode stages (engine/staged.py) are token-exact with mlx-lm's own greedy
generation on every architecture the runner's tests cover (float32), batched and ragged,
and leave the eager path of the same runner unchanged."""

import mlx.core as mx
import pytest
from mlx_lm.utils import load
from models import CONFIGS, make
from test_runner import prompts, reference

from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.engine.staged import StagedLayer


def staged_runner(model, compile_decode=True):
    return ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 24),
                       RunnerConfig(compile_decode=compile_decode))


@pytest.fixture(scope="module", params=list(CONFIGS))
def arch_model(request, model_root):
    model, _ = load(str(make(model_root, request.param)))
    return request.param, model


def test_staged_generation_is_token_exact(arch_model):
    _, model = arch_model
    ps = prompts(5, seed=11)
    runner = staged_runner(model)
    assert all(isinstance(layer, StagedLayer) for layer in model.layers)
    got = greedy_generate(runner, ps, 14)
    assert got == [reference(model, p, 14) for p in ps]
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


def test_staged_and_eager_logits_agree_bitwise(arch_model):
    """The same decode step, staged and eager, in one runner: identical logits."""
    _, model = arch_model
    runner = staged_runner(model)
    table = runner.allocator.allocate(4)
    runner.forward([SeqInput(list(range(1, 40)), 0, table, want_logits=False)], [])
    seqs = [SeqInput([7], 39, table)]
    out = {}
    for mode in (True, False, True):
        runner.compile_decode = mode
        _, logits = runner.forward([], seqs)
        out.setdefault(mode, []).append(logits)
    mx.eval(out)
    assert mx.array_equal(out[True][0], out[False][0])
    assert mx.array_equal(out[True][0], out[True][1])
    runner.allocator.free(table)


def test_eager_runner_keeps_the_model_layers(model_root):
    model, _ = load(str(make(model_root, "llama-gqa")))
    staged_runner(model, compile_decode=False)
    assert not any(isinstance(layer, StagedLayer) for layer in model.layers)

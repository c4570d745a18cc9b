"""Compiled decode stages (engine/staged.py) are token-exact with mlx-lm's own greedy
generation on every architecture the runner's tests cover (float32), batched and ragged,
and leave the eager path of the same runner unchanged."""

import gc

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load
from models import CONFIGS, make
from test_runner import greedy_agrees, prompts, reference

from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.fused import FusedDecodeStages
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.engine.staged import StagedLayer


def staged_runner(model, compile_decode=True, linear_layout=True):
    return ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 24),
                       RunnerConfig(compile_decode=compile_decode, linear_layout=linear_layout))


# layout "plain": nn.Linear kept (as on a GPU), so llama-family layers run the fused
# hand-written stages (engine/fused.py); "transposed": CPU's float32 layout, traced stages
# (on a GPU the layout does not apply: both run the fused stages)
LAYOUTS = {"plain": False, "transposed": True}
FUSED = {"llama-mha", "llama-gqa", "qwen2-bias", "qwen3-qknorm"}


@pytest.fixture(scope="module", params=[(a, lay) for a in CONFIGS for lay in LAYOUTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def arch_model(request, model_root):
    arch, layout = request.param
    model, _ = load(str(make(model_root, arch)))
    runner = staged_runner(model, linear_layout=LAYOUTS[layout])
    return arch, layout, model, runner


def test_staged_generation_is_token_exact(arch_model):
    arch, layout, model, runner = arch_model
    ps = prompts(5, seed=11)
    assert all(isinstance(layer, StagedLayer) for layer in model.layers)
    # the transposed layout applies on CPU only: on a GPU every layout keeps nn.Linear
    plain = layout == "plain" or mx.default_device() != mx.cpu
    fused = arch in FUSED and plain
    assert all((layer.fused is not None) == fused for layer in model.layers)
    got = greedy_generate(runner, ps, 14)
    assert all(greedy_agrees(model, p, g, 14) for p, g in zip(ps, got, strict=True))
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()


def test_staged_and_eager_logits_agree_bitwise(arch_model):
    """The same decode step, staged and eager, in one runner: identical logits."""
    _, _, model, runner = arch_model
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


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias"])
def test_fused_stages_of_a_quantized_model(arch, model_root):
    """4-bit projections fuse too (weights, scales, biases concatenated): greedy output
    equals mlx-lm's and the staged step's logits equal the eager step's."""
    model, _ = load(str(make(model_root, arch)))
    nn.quantize(model, group_size=32, bits=4)
    runner = staged_runner(model)
    assert all(layer.fused is not None and layer.fused.qkv.quantized for layer in model.layers)
    ps = prompts(3, seed=5)
    assert greedy_generate(runner, ps, 10) == [reference(model, p, 10) for p in ps]
    table = runner.allocator.allocate(4)
    runner.forward([SeqInput(list(range(1, 30)), 0, table, want_logits=False)], [])
    out = []
    for mode in (True, False):
        runner.compile_decode = mode
        out.append(runner.forward([], [SeqInput([9], 29, table)])[1])
    mx.eval(out)
    assert mx.array_equal(out[0], out[1])
    runner.allocator.free(table)


def test_fused_projection_weights_are_views_of_one_array(model_root):
    """After fusing, q/k/v_proj's weights are row slices of the fused weight: the same
    values as before, and the model holds no second copy (one buffer per fused group)."""
    model, _ = load(str(make(model_root, "qwen2-bias")))
    attn = model.layers[0].self_attn
    before = [mx.array(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    mx.eval(before)
    gc.collect()
    held = mx.get_active_memory()
    fused = FusedDecodeStages.match(model.layers[0])
    gc.collect()
    assert mx.get_active_memory() <= held  # the originals were dropped, views kept
    rows = 0
    for p, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), before, strict=True):
        assert mx.array_equal(p.weight, w)
        assert mx.array_equal(fused.qkv.arrays["weight"][rows : rows + w.shape[0]], w)
        rows += w.shape[0]
    assert rows == fused.qkv.arrays["weight"].shape[0]

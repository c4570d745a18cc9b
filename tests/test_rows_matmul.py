"""The few-rows projection kernel (engine/rows_matmul.py).

On CUDA: the kernel against a float64 reference on random data (rows 2-16, the Llama and
Qwen shapes, float16 / bfloat16, with and without a bias), and a bfloat16 model's decode
logits with the kernel against MLX's matmul.  On CPU (CI): it declines cleanly, and a
stand-in with the kernel's contract checks the routing: fused projections of 2-16 rows
go through it (bias included), one row and prefill do not, and the logits are unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load
from models import make, make_cuda
from test_runner import prompts

from slabserve.engine import runner as runner_mod
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.rows_matmul import RowsMatmul
from slabserve.engine.runner import ModelRunner, SeqInput

HAS_CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (MLX CUDA build)")


class ContractRows(RowsMatmul):
    """The kernel's contract in MLX ops, accepted on any device; counts its uses."""

    def __init__(self) -> None:
        super().__init__()
        self.rows_seen: list[int] = []

    def applies(self, x, w) -> bool:
        return x.ndim == 2 and 2 <= x.shape[0] <= self.MAX_ROWS and x.shape[1] % 8 == 0

    def __call__(self, x, w, bias=None):
        self.rows_seen.append(x.shape[0])
        y = (x.astype(mx.float32) @ w.astype(mx.float32).T)
        if bias is not None:
            y = y + bias.astype(mx.float32)
        return y.astype(x.dtype)


def test_declines_off_cuda():
    if HAS_CUDA:
        pytest.skip("a CUDA device: the kernel's own tests run")
    rows = RowsMatmul()
    assert rows.probe() == "not a CUDA device"
    x, w = mx.zeros((4, 64), mx.float16), mx.zeros((32, 64), mx.float16)
    assert not rows.applies(x, w)
    assert runner_mod._rows_matmul(RunnerConfig(compile_decode=True, rows_matmul=True)) is None


def _decode_logits(path, rows, batch: int, dtype=None):
    """One decode step of ``batch`` sequences (after their prefill) of a fresh load of
    the model at ``path`` (compiled stages trace anew) with fused stages whose
    projections go through ``rows`` (None: MLX's matmul)."""
    model = load(str(path))[0]
    if dtype is not None:
        model.set_dtype(dtype)
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=256,
                                            kv_budget_bytes=1 << 24),
                         RunnerConfig(compile_decode=True, step_graph=False,
                                      linear_layout=False))
    for layer in model.layers:  # the staged layers' projections, as the runner built them
        for p in (layer.fused.qkv, layer.fused.o, layer.fused.gate_up, layer.fused.down):
            p.rows = rows
    ps = prompts(batch, seed=5)
    tables = [runner.allocator.allocate(-(-(len(p) + 1) // 16)) for p in ps]
    runner.forward([SeqInput(p, 0, t, want_logits=False)
                    for p, t in zip(ps, tables, strict=True)], [])
    logits = runner.forward([], [SeqInput([3], len(p), t)
                                 for p, t in zip(ps, tables, strict=True)])[1]
    mx.eval(logits)
    for t in tables:
        runner.allocator.free(t)
    return logits.astype(mx.float32), len(model.layers)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_fused_projections_route_few_rows_through_it(name, model_root):
    """With a stand-in of the kernel's contract, decode steps of 2-16 sequences send
    every fused projection through it (bias included) and one sequence none; logits as
    MLX's matmul gives them."""
    path = make(model_root, name)
    base, layers = _decode_logits(path, None, 4)
    rows = ContractRows()
    got, _ = _decode_logits(path, rows, 4)
    assert set(rows.rows_seen) == {4}
    assert len(rows.rows_seen) == 4 * layers  # qkv, o, gate_up, down: traced once each
    assert mx.allclose(got, base, atol=1e-4, rtol=1e-4)
    one = ContractRows()
    _decode_logits(path, one, 1)
    assert one.rows_seen == []


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_kernel_against_float64(dtype):
    """Rows 2-16, Llama-1B and Qwen-0.5B projection shapes and small odd ones, with and
    without a bias: within the dtype's rounding of the float64 product."""
    rows = RowsMatmul()
    assert rows.probe() is None
    rng = np.random.default_rng(0)
    tol = 8e-3 if dtype == mx.bfloat16 else 1e-3
    for m in (2, 3, 7, 8, 16):
        for n, k in ((3072, 2048), (2048, 8192), (16384, 2048), (1152, 896), (40, 64)):
            x = rng.standard_normal((m, k))
            w = rng.standard_normal((n, k)) / np.sqrt(k)
            b = rng.standard_normal(n)
            xa, wa, ba = (mx.array(a.astype(np.float32)).astype(dtype) for a in (x, w, b))
            assert rows.applies(xa, wa)
            xr, wr, br = (np.array(a.astype(mx.float32)).astype(np.float64)
                          for a in (xa, wa, ba))
            for bias, ref in ((None, xr @ wr.T), (ba, xr @ wr.T + br)):
                got = np.array(rows(xa, wa, bias).astype(mx.float32)).astype(np.float64)
                err = np.abs(got - ref).max() / np.abs(ref).max()
                assert err <= tol, (m, n, k, bias is not None, err)


@needs_cuda
@pytest.mark.cuda
def test_bfloat16_model_logits_with_the_kernel(model_root):
    """A bfloat16 model's decode step of 4 sequences: logits with the kernel within
    bfloat16 rounding of MLX's matmul's."""
    rows = RowsMatmul()
    assert rows.probe() is None
    base, _ = _decode_logits(make_cuda(model_root), None, 4, mx.bfloat16)
    got, _ = _decode_logits(make_cuda(model_root), rows, 4, mx.bfloat16)
    scale = mx.abs(base).max().item()
    assert mx.abs(got - base).max().item() <= 2e-2 * scale

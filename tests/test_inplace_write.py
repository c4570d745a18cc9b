"""In-place K/V writes for step graphs on CUDA (kvcache/inplace.py).

On CPU: the plan's rows put every token where the pool's scatter writes put it (float and
int8 pools, several slabs, padded rows), the pool hands such a plan's writes to its writer
and keeps the token for the layer's readers, a step graph hands each layer's token to that
layer's attention launch (the kernel's stand-in), and the probe refuses a kernel that does
not write or fails.  On CUDA: the probe passes, and step graphs overlapped as async scheduling
runs them (the next step evaluated before the one before it finished) write in place: no
step's peak memory reaches a slab, where MLX's scatter copied the whole slab each step."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load
from models import make_cuda

from slabserve.attention.reference import random_pool
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.kvcache import PoolGeometry, SlabPool
from slabserve.kvcache.inplace import InPlaceWritePlan, InPlaceWriter, reference_write
from slabserve.kvcache.quant import quantize
from slabserve.kvcache.spread import SpreadWritePlan

HAS_CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (MLX CUDA build)")


def _host(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def _pool(dtype) -> SlabPool:
    """One layer, three slabs of five 4-token blocks, 2 kv heads of 8: random pages."""
    return random_pool(PoolGeometry(1, 2, 8, 4, 5, dtype), 3, mx.random.key(0))


@pytest.mark.parametrize("dtype", [mx.float16, mx.int8])
@pytest.mark.parametrize("pad", [0, 2])
def test_plan_rows_put_each_token_where_the_scatter_does(dtype, pad):
    """The plan's rows, written by the kernel's contract (``reference_write``), leave the
    pool as the scatter plan's writes do; a padded batch's extra rows write nothing."""
    pool = _pool(dtype)
    g = pool.geom
    slots = [(0, 1), (7, 3), (14, 0), (9, 2)]  # blocks in slabs 0, 1, 2, 1
    slots += [slots[0]] * pad  # padded rows copy the first slot
    rng = np.random.default_rng(1)
    k, v = (mx.array(rng.standard_normal((len(slots), g.kv_heads, g.head_dim))
                     .astype(np.float16)) for _ in range(2))
    before = [_host(a) for a in pool.arrays()]
    plan = InPlaceWritePlan(g, slots, writer=None, pad=pad)
    rows = np.array(plan.packed)
    assert rows.shape == (len(slots) * g.kv_heads,) and plan.key == ("inplace", rows.size)
    assert (rows[len(rows) - pad * g.kv_heads:] == -1).all() and (rows[:4 * g.kv_heads] >= 0).all()
    flat_k, flat_v = k.reshape(-1, g.head_dim), v.reshape(-1, g.head_dim)
    if g.quantized:
        (kq, ks), (vq, vs) = quantize(flat_k), quantize(flat_v)
        new = [kq, vq, ks, vs]
    else:
        new = [flat_k, flat_v, None, None]
    want = reference_write(before, rows, new, g.slab_blocks * g.kv_heads * g.block_size)
    pool.write(0, SpreadWritePlan(g, slots, pad), flat_k, flat_v)  # pads: slot 0's own
    got = [_host(a) for a in pool.arrays()]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plan.rebind(plan.packed).key == plan.key


class RecordingWriter:
    def __init__(self):
        self.calls = []

    def write(self, pool, layer, rows, k, v, k_scale=None, v_scale=None):
        self.calls.append((layer, rows, k, v, k_scale, v_scale))
        return mx.zeros((4,), dtype=mx.int32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.int8])
def test_pool_hands_an_in_place_plan_to_its_writer(dtype):
    """``SlabPool.write`` with an in-place plan: the writer gets the flat rows, the values
    in the pool's dtype (int8 with their scales), and the token waits in ``deps`` for the
    layer's readers and is pending (so the write runs if nothing reads it); no slab is
    replaced."""
    pool = _pool(dtype)
    arrays = pool.arrays()
    writer = RecordingWriter()
    plan = InPlaceWritePlan(pool.geom, [(3, 1)], writer)
    k = mx.ones((1, 2, 8), dtype=mx.float32)
    pool.write(0, plan, k, 2 * k)
    (layer, rows, kw, vw, ks, vs), = writer.calls
    assert layer == 0 and rows is plan.packed and kw.shape == (2, 8)
    if dtype == mx.int8:
        assert kw.dtype == mx.int8 and ks.shape == (2, 1) and ks.dtype == mx.float16
        assert vs is not None and vw.dtype == mx.int8
    else:
        assert kw.dtype == dtype and ks is None and vs is None
    token = pool.deps[0]
    assert token.shape == (4,)
    pending = pool.take_pending()  # the token alone: no slab replaced, the write still runs
    assert len(pending) == 1 and pending[0] is token and pool.deps == {}
    assert all(a is b for a, b in zip(pool.arrays(), arrays, strict=True))


def test_probe_refuses_a_kernel_that_does_not_write_or_fails(monkeypatch):
    """The probe compares the pool after the kernel with the contract's result: a kernel
    that leaves the slabs as they were, or raises, is declined with the reason."""
    geom = PoolGeometry(2, 2, 8, 4, 64, mx.float16)

    def inert(**_):
        return lambda **kw: [mx.zeros(kw["output_shapes"][0], dtype=mx.int32)]
    monkeypatch.setattr(mx.fast, "cuda_kernel", inert)
    assert InPlaceWriter().probe(geom) == "probe wrote the wrong rows (1 slab(s))"

    def broken(**_):
        raise RuntimeError("nvrtc: error")
    monkeypatch.setattr(mx.fast, "cuda_kernel", broken)
    assert InPlaceWriter().probe(geom).startswith("kernel failed: RuntimeError: nvrtc")


def test_no_writer_without_cuda(model_root):
    """Off CUDA (or asked not to) step graphs keep the scatter writes."""
    if HAS_CUDA:
        pytest.skip("a CUDA device takes the in-place writes")
    from models import make

    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = ModelRunner(model, CacheConfig(block_size=16, kv_budget_bytes=1 << 22),
                         RunnerConfig(compile_decode=True, linear_layout=False))
    assert runner.step_graphs is None or runner.step_graphs.writer is None


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.int8])
def test_probe_passes_on_cuda(dtype):
    assert InPlaceWriter().probe(PoolGeometry(16, 8, 64, 16, 256, dtype), (1, 2, 5)) is None


@needs_cuda
@pytest.mark.cuda
def test_overlapped_steps_write_in_place(model_root):
    """Two decode steps submitted back to back (the second evaluated while the first
    runs, as async scheduling does) write in place: no step's peak memory reaches half a
    slab (MLX's scatters copied the slab there: docs/adr/0014-inplace-kv-writes.md)."""
    model = load(str(make_cuda(model_root)))[0]
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=1 << 16,
                                            kv_budget_bytes=1 << 30),
                         RunnerConfig(compile_decode=True))
    assert runner.step_graphs.writer is not None
    slab = runner.pool.arrays()[0].nbytes
    table = runner.allocator.allocate(2)
    runner.forward([SeqInput(list(range(1, 20)), 0, table, want_logits=False)], [])
    mx.eval(runner.pool.arrays())
    peaks = []
    for pos in range(19, 25, 2):
        gc.collect()
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        first = runner.forward([], [SeqInput([6], pos, table)])[1]
        second = runner.forward([], [SeqInput([7], pos + 1, table)])[1]
        mx.eval(first, second)
        peaks.append(mx.get_peak_memory() - base)
    runner.allocator.free(table)
    assert max(peaks) < slab // 2, (peaks, slab)


class TokenWriter(RecordingWriter):
    """A writer whose tokens are told apart by identity (no rows written: plumbing)."""

    def write(self, pool, layer, rows, k, v, k_scale=None, v_scale=None):
        super().write(pool, layer, rows, k, v, k_scale, v_scale)
        token = mx.full((4,), layer, dtype=mx.int32)
        self.tokens.append(token)
        return token


def test_step_graph_hands_each_layers_token_to_its_attention(model_root):
    """With a writer, a CPU step graph (the kernel's stand-in) writes through it once per
    layer with the step's rows, each layer's attention launch takes that layer's token as
    its last input, the graph outputs its logits only, and the pool keeps its arrays."""
    if HAS_CUDA:
        pytest.skip("the kernel stand-in is a CPU check")
    from models import make
    from test_step_graph import ContractKernelCUDA

    from slabserve.attention import Selector

    deps = []

    class RecordingKernel(ContractKernelCUDA):
        def _kernel(self, kind, ns, smem, variant, scale=1.0, sb=0):
            inner = super()._kernel(kind, ns, smem, variant, scale, sb)

            def kernel(*, inputs, **kw):
                deps.append(inputs[-1])
                return inner(inputs=inputs, **kw)
            return kernel

    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 24),
                         RunnerConfig(compile_decode=True, linear_layout=False, max_context=512),
                         Selector(override=True, natives={"cpu": RecordingKernel()}))
    writer = TokenWriter()
    writer.tokens = []
    runner.step_graphs.writer = writer
    table = runner.allocator.allocate(2)
    runner.forward([SeqInput(list(range(1, 20)), 0, table, want_logits=False)], [])
    arrays = runner.pool.arrays()
    logits = runner.forward([], [SeqInput([6], 19, table)])[1]
    mx.eval(logits)
    layers = len(model.layers)
    assert [c[0] for c in writer.calls] == list(range(layers))
    # one rows input for every layer (traced: the step's packed rows), one row a kv head
    assert all(c[1] is writer.calls[0][1] for c in writer.calls)
    assert writer.calls[0][1].shape == (runner.geom.kv_heads,)
    assert len(deps) == layers and all(d is t for d, t in zip(deps, writer.tokens, strict=True))
    (graph,) = runner.step_graphs._graphs.values()
    assert graph.written == [] and logits.shape == (1, model.args.vocab_size)
    assert all(a is b for a, b in zip(runner.pool.arrays(), arrays, strict=True))
    runner.allocator.free(table)

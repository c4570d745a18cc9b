"""Native (CPU) == gather-SDPA == float64 reference on random paged data: ragged lengths,
GQA ratios 1/2/4/7, head_dim 64/128, block sizes 16/32, one and several slabs, shuffled
tables, float32/float16/bfloat16."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from attention_cases import make_case, slabs_touched

from slabserve.attention.gather import GatherSDPA
from slabserve.attention.native_cpu import NativeCPU
from slabserve.attention.reference import reference_decode

# (q_heads, kv_heads): GQA ratios 1, 2, 4, 7 (7 as Qwen2.5-0.5B's 14/2)
HEADS = [(4, 4), (4, 2), (8, 2), (14, 2)]
LENGTHS = [37, 1, 96, 150]  # ragged; 96 fills whole blocks of 16 and 32
TOL = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}  # relative to max |ref|

PATHS = {
    "gather": GatherSDPA(),
    "native": NativeCPU(),  # defaults: 2 streams, 64-block chunks
    # many chunks to merge, on two streams even for small cases
    "native-small-chunks": NativeCPU(streams=2, chunk_blocks=2, min_stream_tokens=0),
    "native-1-stream": NativeCPU(streams=1, chunk_blocks=3),
}


def check(path, q, pool, batch, dtype):
    scale = q.shape[-1] ** -0.5
    assert path.decline(q, pool, batch) is None
    out = path(q, pool, 0, batch, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference_decode(q, pool, 0, batch, scale)
    got = np.array(out.astype(mx.float32), dtype=np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < TOL[dtype], f"{path.name}: relative error {err:.2e}"
    return got


@pytest.mark.parametrize(
    "heads,head_dim,block_size,slabs",
    list(itertools.product(HEADS, (64, 128), (16, 32), (1, 3))),
)
def test_paths_match_reference_f32(heads, head_dim, block_size, slabs):
    q, pool, batch = make_case(*heads, head_dim, block_size, LENGTHS, slabs,
                               seed=hash((heads, head_dim, block_size, slabs)) % 1000)
    assert slabs_touched(pool, batch) == slabs
    outs = {name: check(p, q, pool, batch, mx.float32) for name, p in PATHS.items()}
    # the paths agree with each other as closely as with the reference
    assert np.abs(outs["native"] - outs["gather"]).max() < 1e-5


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("heads,block_size,slabs", [((8, 2), 16, 3), ((14, 2), 32, 1),
                                                     ((4, 4), 16, 2)])
def test_paths_match_reference_half(dtype, heads, block_size, slabs):
    q, pool, batch = make_case(*heads, 64, block_size, LENGTHS, slabs, dtype=dtype, seed=5)
    for p in PATHS.values():
        check(p, q, pool, batch, dtype)


def test_long_context_many_chunks_and_slabs():
    """Contexts over several default chunks and both streams, pages over 5 slabs."""
    q, pool, batch = make_case(8, 2, 64, 16, [2500, 1100, 17], 5, seed=7)
    native = PATHS["native"]
    assert len(native.plan(batch).parts) == 2 and len(native.plan(batch).parts[0]) == 2
    for p in (PATHS["gather"], native):
        check(p, q, pool, batch, mx.float32)


def test_small_steps_use_one_stream():
    _, _, batch = make_case(8, 2, 64, 16, [300, 200], 1)
    assert len(PATHS["native"].plan(batch).parts) == 1
    assert len(PATHS["native-small-chunks"].plan(batch).parts) == 2


def test_single_kv_head_group_of_seven():
    q, pool, batch = make_case(7, 1, 128, 32, [70, 5, 33], 2, seed=9)
    for p in PATHS.values():
        check(p, q, pool, batch, mx.float32)


def test_native_never_copies_a_slab():
    """The pool's slab arrays are the same objects, unchanged, after a native call."""
    q, pool, batch = make_case(4, 2, 64, 16, [70, 33], 2, seed=3)
    before = [id(a) for a in pool.k[0] + pool.v[0]]
    snapshot = [np.array(a) for a in pool.k[0]]
    mx.eval(NativeCPU()(q, pool, 0, batch, 0.125))
    assert [id(a) for a in pool.k[0] + pool.v[0]] == before
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(snapshot, pool.k[0], strict=True))


@pytest.mark.parametrize("bad,reason", [
    ("two_queries", "not_single_query"),
    ("int_dtype", "dtype_unsupported"),
    ("heads", "head_geometry_mismatch"),
])
def test_native_cpu_declines_with_reason(bad, reason):
    q, pool, batch = make_case(4, 2, 64, 16, [20], 1)
    if bad == "two_queries":
        q = mx.concatenate([q, q], axis=2)
    elif bad == "int_dtype":
        q = q.astype(mx.int32)
    else:
        q = q[:, :3]
    assert NativeCPU().decline(q, pool, batch) == reason
    assert GatherSDPA().decline(q, pool, batch) is None

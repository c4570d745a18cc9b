"""CUDA kernel sources and per-case choices for the native pooled decode path: which
variant and how many q heads per GPU block a case gets, the kernel body for ``ns`` slab
inputs, shared-memory sizes, shape declines.  Pure functions of shapes and dtypes: no device
use, so they are tested everywhere (attention/native_cuda.py launches them).

Shipped variants (docs/adr/0004-cuda-kernel.md): "mma" (tensor cores), "lean" (FMA, the
row-group reduction through shared memory) and "async" (FMA, shuffle reduction: the
fallback wherever neither applies), all over a cp.async stage ring of STAGES stages; an
int8 pool always runs INT8_VARIANT (tensor cores over int8 pages and scale slabs).  The
variants measured and not adopted (register loads, bulk copies, the first shared-memory
reduction) are in git history and the ADR."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from slabserve.kvcache.pool import PoolGeometry, SlabPool

COMMON_FILE = Path(__file__).parent / "kernels" / "pooled_common.cu"
KERNEL_FILE = Path(__file__).parent / "kernels" / "pooled_decode.cu"
MMA_FILE = Path(__file__).parent / "kernels" / "pooled_decode_mma.cu"
INT8_FILE = Path(__file__).parent / "kernels" / "pooled_decode_int8.cu"
# The kernel of an int8 pool (kvcache/quant.py), whatever variant is asked for: tensor-core
# products over the int8 pages and their scale slabs (kernels/pooled_decode_int8.cu).
INT8_VARIANT = "int8"
# sources a variant appends to the common and main kernel files
VARIANT_FILES: dict[str, tuple[Path, ...]] = {"mma": (MMA_FILE,),
                                              INT8_VARIANT: (MMA_FILE, INT8_FILE)}
VARIANTS = ("auto", "mma", "async", "lean")
RING_VARIANTS = ("async", "lean")  # FMA products over a shared-memory ring
TENSOR_VARIANTS = ("mma", INT8_VARIANT)  # 16-token tiles, up to 16 q heads a block
SLAB_LITERAL_VARIANTS = ("lean", INT8_VARIANT)  # the slab size a literal of the source
# The register-load work split (U = 8 tokens for up to 4 heads a block, no shared-memory
# ring) has no CUDA source: NativeMetal's own kernel runs it under this name.
REGISTER_VARIANT = "sync"
STAGES = 3  # cp.async ring depth (4 gained nothing, docs/adr/0004-cuda-kernel.md)
MMA_MIN_GROUP = 6  # "auto": tensor cores from this many q heads per kv head (see case_variant)
MMA_DTYPES = (mx.float16, mx.bfloat16)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
POOL_DTYPES = (*DTYPES, mx.int8)
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 64)
MAX_SLABS = 512
THREADS = 128
MAX_GROUP = 8
MMA_MAX_GROUP = 16  # the M rows of one m16n8k16 tile
SM_SMEM = 232448  # bytes of shared memory per multiprocessor on H100/H200 (227 KiB)
LOG2E = 1.4426950408889634


def slab_bucket(n: int) -> int:
    """Slab-count bucket: the power of two at or above ``n``."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


FIXED_SLAB_INPUTS = 32  # beyond this, per-call input lists cost more than a recompile


def pool_slab_inputs(pool: SlabPool) -> int:
    """Slab inputs of the kernel for ``pool``: the bucket of its current size, but at least
    the bucket of the most slabs it will hold (``pool.max_slabs``, capped at
    FIXED_SLAB_INPUTS), so a pool that grows compiles once: an H200 load test recompiled
    at every bucket the pool grew through, stalling every stream for seconds."""
    cap = min(slab_bucket(pool.max_slabs or 1), FIXED_SLAB_INPUTS)
    return max(slab_bucket(pool.num_slabs), cap)


def group_block(g: int, cap: int = MAX_GROUP) -> int:
    """q heads per GPU block: the largest divisor of the GQA ratio ``g`` up to ``cap``
    (8 for the FMA variants, 16 for the tensor-core variant)."""
    return max(d for d in range(1, min(g, cap) + 1) if g % d == 0)


def lean_applies(pool_dtype, group: int, head_dim: int | None) -> bool:
    """Whether the "lean" kernel takes a case: a float16/bfloat16 pool and head_dim 64 with
    2 or 4 q heads per kv head (8 lanes per K row), or head_dim 128 with 4 (16 lanes)."""
    if pool_dtype not in MMA_DTYPES:
        return False
    return (head_dim == 64 and group in (2, 4)) or (head_dim == 128 and group == 4)


def case_variant(variant: str, q_dtype, pool_dtype, group: int = 1,
                 head_dim: int | None = None) -> str:
    """The variant that runs a case.  "mma" needs a float16/bfloat16 pool and a query of the
    same dtype, "lean" needs ``lean_applies``; otherwise the "async" FMA variant takes the
    case.  "auto" (H200 measurements, docs/adr/0004-cuda-kernel.md): "mma" where it applies
    with at least MMA_MIN_GROUP q heads per kv head (15-32% faster than the FMA kernel at 7,
    Qwen2.5-0.5B's 14/2; 5 is unmeasured; 15-37% slower than "lean" at 4), else "lean" where
    it applies (32/8/64 fp16: 5-16% faster per layer than "async" at B >= 4 and 16-32k in
    its first form, faster again chained in its lean form), else "async".  An int8 pool
    always gets INT8_VARIANT (its only kernel)."""
    if pool_dtype == mx.int8:
        return INT8_VARIANT
    mma_ok = pool_dtype in MMA_DTYPES and q_dtype == pool_dtype
    lean_ok = lean_applies(pool_dtype, group, head_dim)
    if variant == "auto":
        if mma_ok and group >= MMA_MIN_GROUP:
            return "mma"
        return "lean" if lean_ok else "async"
    if (variant == "mma" and not mma_ok) or (variant == "lean" and not lean_ok):
        return "async"
    return variant


def slab_literal(variant: str, slab_blocks: int) -> int:
    """The slab size to compile into ``variant``'s source (``kernel_body``'s
    ``slab_blocks``; one build per pool geometry), or 0: read from the first slab's shape."""
    return slab_blocks if variant in SLAB_LITERAL_VARIANTS else 0


def unit_tokens(gb: int, variant: str = REGISTER_VARIANT) -> int:
    """Tokens a row group loads at once: 4 for the ring variants (several units in flight
    through shared memory); the register-load split holds ``gb * unit`` scores in
    registers (8 tokens up to 4 heads).  The mma kernel ignores it (16-token tiles)."""
    if variant in RING_VARIANTS:
        return 4
    return 8 if gb <= 4 else 4


def shape_decline(q_shape, q_dtype, geom: PoolGeometry, num_slabs: int) -> str | None:
    """Why the kernel cannot take this shape or dtype, or ``None``.  Pure: no device use."""
    if len(q_shape) != 4 or q_shape[2] != 1:
        return f"q must be [B, q_heads, 1, head_dim], got {tuple(q_shape)}"
    if q_shape[3] != geom.head_dim:
        return f"q head_dim {q_shape[3]} != pool head_dim {geom.head_dim}"
    if geom.head_dim not in HEAD_DIMS:
        return f"head_dim {geom.head_dim} unsupported (only {HEAD_DIMS})"
    if geom.block_size not in BLOCK_SIZES:
        return f"block_size {geom.block_size} unsupported (only {BLOCK_SIZES})"
    if geom.dtype not in POOL_DTYPES:
        return f"pool dtype {geom.dtype} unsupported (float16, bfloat16, float32, int8)"
    if q_dtype not in DTYPES:
        return f"q dtype {q_dtype} unsupported (float16, bfloat16, float32)"
    if q_shape[1] % geom.kv_heads:
        return f"q_heads {q_shape[1]} not a multiple of kv_heads {geom.kv_heads}"
    if num_slabs < 1:
        return "pool has no slabs"
    if num_slabs > MAX_SLABS:
        return f"{num_slabs} slabs exceed the kernel's {MAX_SLABS}-slab limit"
    return None


KIND_OUTPUTS = {  # kernel kind -> (output arguments of the variant call, DIRECT flag)
    "direct": ("out, nullptr, nullptr, nullptr", "true"),  # one chunk: writes out
    "split": ("nullptr, opart, lse, nullptr", "false"),  # partials; a merge launch follows
    "fused": ("out, opart, lse, const_cast<int*>(counters)", "false"),  # last chunk merges
}


def kernel_body(ns: int, kind: str, variant: str = "async", scale: float = 1.0,
                slab_blocks: int = 0) -> str:
    """Body of the pooled kernel for ``ns`` slab inputs ``k0..``, ``v0..``; ``kind`` one of
    KIND_OUTPUTS; ``variant`` "mma" (tensor cores), "async" (FMA) or "lean" (FMA, the
    shared-memory reduction), each over a cp.async ring in dynamic shared memory
    (ValueError for another).
    ``scale``, the softmax scale, is a literal of the source, not an input: a 4-byte input
    lives in MLX's managed scalar pool, whose read cost every launch ~9 us on an H200
    (kvcache/arrays.py).  ``slab_blocks`` > 0 makes the slab size a literal too (the
    division of a block id by it becomes a shift or a multiply), else it is read from the
    first slab's shape."""
    fill = "\n".join(f"    ktab[{i}] = k{i}; vtab[{i}] = v{i};" for i in range(ns))
    sb = str(slab_blocks) if slab_blocks > 0 else "k0_shape[0] / (HKV * BS)"
    outs, flag = KIND_OUTPUTS[kind]
    scales = ""
    if variant == INT8_VARIANT:  # the scale slabs ks0.., vs0.. beside the value slabs
        fill += "\n" + "\n".join(f"    kstab[{i}] = ks{i}; vstab[{i}] = vs{i};"
                                  for i in range(ns))
        scales = "  __shared__ const __half* kstab[NS];\n  __shared__ const __half* vstab[NS];\n"
        call = f"pooled_decode_int8<TQ, T, D, BS, HKV, G, GB, NS, NT, ST, {flag}>"
        outs = f"kstab, vstab, {outs}"
    elif variant == "mma":
        call = f"pooled_decode_mma<T, D, BS, HKV, G, GB, NS, NT, ST, {flag}>"
    elif variant in RING_VARIANTS:
        lean = ", true" if variant == "lean" else ""
        call = f"pooled_decode_async<TQ, T, D, BS, HKV, G, GB, NS, U, NT, ST, {flag}{lean}>"
    else:
        raise ValueError(f"no CUDA source for variant {variant!r} (one of {VARIANTS[1:]})")
    return f"""  extern __shared__ uint4 slabserve_smem[];
  __shared__ const T* ktab[NS];
  __shared__ const T* vtab[NS];
{scales}  if (threadIdx.x == 0) {{
{fill}
  }}
  __syncthreads();
  ::slabserve::{call}(
      q, table, lengths, table_shape[1], MP, {sb}, {scale * LOG2E!r}f,
      ktab, vtab, {outs}, slabserve_smem);
"""


def smem_bytes(variant: str, dtype_size: int, d: int, gb: int, unit: int, stages: int,
               threads: int = THREADS) -> int:
    """Dynamic shared memory of a variant: the stage ring, reused by the merge (0 for the
    register-load split)."""
    if variant in TENSOR_VARIANTS:
        warps = threads // 32
        # 16-byte slots per lane and tile: K and V (mma); K, V and the scales (int8)
        slots = d // 8 if variant == "mma" else d // 32 + d // 32 + 1
        return max(stages * slots * threads * 16, (warps * gb * d + 2 * warps * gb) * 4)
    if variant not in RING_VARIANTS:
        return 0
    rows = threads // (d * dtype_size // 16)
    return max(stages * 2 * unit * threads * 16, (rows * gb * d + 2 * rows * gb) * 4)


MERGE_BODY = "  ::slabserve::merge_chunks<TQ, D>(opart, lse, lse_shape[1], out);\n"

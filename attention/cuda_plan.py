"""Host-side plan for the native pooled decode kernels: how many context chunks.

The kernel runs one GPU block per (sequence, kv head [x q-head subgroup], chunk).  With few
sequences and heads the GPU is filled only by splitting the context into chunks, each
merged afterwards by log-sum-exp; every chunk costs a partial output written and read back,
so chunks stay long enough to amortise that.  The plan is a pure function of the shape,
cached per shape bucket (batch, context rounded up to a power of two, head blocks).

Invariants: ``1 <= chunks <= max_chunks`` and, for a context of ``n`` tokens,
``chunks <= max(1, n // min_chunk_tokens)`` (no chunk shorter than the minimum unless the
whole context is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class PlanParams:
    """Knobs of the chunk plan.  ``blocks_per_sm``: blocks resident per multiprocessor
    (4 for the async kernel at 128 registers and 48 KB of shared memory; one wave is the
    target); ``sm_count``: multiprocessors (132 on H100 and H200).  ``fused_max_bytes``:
    layers that read at most this many K/V bytes merge their chunks inside the main launch
    (one launch per layer instead of two: small layers are bound by the per-launch cost);
    larger ones keep the separate merge launch (the fused kernel's last block costs more
    there than the launch it saves).  The target is one wave of resident blocks (two and
    four waves were measured slower).  Measured: docs/adr/0004-cuda-kernel.md."""

    sm_count: int = 132
    blocks_per_sm: float = 4.0
    min_chunk_tokens: int = 256
    max_chunks: int = 64
    fused_max_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        if self.sm_count <= 0 or self.blocks_per_sm <= 0:
            raise ValueError("sm_count and blocks_per_sm must be positive")
        if self.min_chunk_tokens <= 0 or self.max_chunks <= 0:
            raise ValueError("min_chunk_tokens and max_chunks must be positive")
        if self.fused_max_bytes < 0:
            raise ValueError("fused_max_bytes must be >= 0")


DEFAULT_PARAMS = PlanParams()


def ctx_bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@lru_cache(maxsize=4096)
def _chunks_for_bucket(batch: int, bucket: int, head_blocks: int, params: PlanParams) -> int:
    per_chunk = max(1, batch * head_blocks)
    # one whole wave of resident blocks: a partial last wave would idle SMs
    want = math.floor(params.sm_count * params.blocks_per_sm / per_chunk)
    by_len = max(1, bucket // params.min_chunk_tokens)
    return max(1, min(want, by_len, params.max_chunks))


def plan_chunks(
    batch: int,
    max_len: int,
    head_blocks: int,
    num_pages: int,
    params: PlanParams = DEFAULT_PARAMS,
) -> int:
    """Chunks for a step: ``batch`` sequences, the longest ``max_len`` tokens over
    ``num_pages`` table columns, ``head_blocks`` GPU blocks per chunk and sequence.

    Computed for the context's bucket (cached), then capped so that no chunk is empty for
    the longest sequence (at most ``num_pages`` chunks) and no chunk is shorter than
    ``min_chunk_tokens`` of the actual context."""
    if batch <= 0 or max_len <= 0 or head_blocks <= 0 or num_pages <= 0:
        raise ValueError("batch, max_len, head_blocks and num_pages must be positive")
    c = _chunks_for_bucket(batch, ctx_bucket(max_len), head_blocks, params)
    return max(1, min(c, num_pages, max(1, max_len // params.min_chunk_tokens)))


def plan_fused(batch: int, max_len: int, kv_heads: int, head_dim: int, itemsize: int,
               params: PlanParams = DEFAULT_PARAMS) -> bool:
    """Whether a step of ``batch`` sequences (the longest ``max_len`` tokens, bucketed like
    the chunk plan) merges its chunks in the main launch: K and V bytes read per layer at
    most ``params.fused_max_bytes``."""
    kv_bytes = 2 * batch * ctx_bucket(max_len) * kv_heads * head_dim * itemsize
    return kv_bytes <= params.fused_max_bytes


def cache_info():
    """Hit/miss counts of the per-bucket cache (for tests and traces)."""
    return _chunks_for_bucket.cache_info()

"""Host-side plan for the native pooled decode kernels: how many context chunks.

The kernel runs one GPU block per (sequence, kv head [x q-head subgroup], chunk).  With few
sequences and heads the GPU is filled only by splitting the context into chunks, each
merged afterwards by log-sum-exp; every chunk costs a partial output written and read back,
so chunks stay long enough to amortise that.

Two halves: the grid's chunk count is planned here from the batch and head blocks only
(one wave of resident blocks), never from the context, so a compiled step graph's launch
is the same at every length; each sequence then splits its own pages over at most that many
chunks of at least ``min_pages`` pages (the kernels' ``chunk_span``), so a short sequence
uses few chunks and leaves the rest empty.  Whether the merge runs inside the main launch
(``plan_fused``) follows the grid's chunk count and the context's bucket.

Invariants: ``1 <= chunks <= max_chunks``; ``chunks > 1`` only within one wave of resident
blocks; a sequence of ``n`` tokens uses at most ``max(1, pages(n) // min_pages)`` chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PlanParams:
    """Knobs of the chunk plan.  ``blocks_per_sm``: blocks resident per multiprocessor
    (4 for the async kernel at 128 registers and 48 KB of shared memory; one wave is the
    target); ``sm_count``: multiprocessors (132 on H100 and H200).  ``fused_max_bytes``:
    layers that read at most this many K/V bytes merge their chunks inside the main launch
    (one launch per layer instead of two: small layers are bound by the per-launch cost);
    larger ones keep the separate merge launch (the fused kernel's last block costs more
    there than the launch it saves), and grids of at most ``fused_max_chunks`` chunks (the
    fused kernel's time grows with its grid's chunks, used or empty).  ``min_chunk_tokens``:
    the shortest chunk a sequence is split into.  The target is one wave of resident blocks
    (two and four waves were measured slower).  Measured: docs/adr/0004-cuda-kernel.md."""

    sm_count: int = 132
    blocks_per_sm: float = 4.0
    min_chunk_tokens: int = 128
    max_chunks: int = 64
    fused_max_bytes: int = 128 << 20
    fused_max_chunks: int = 8

    def __post_init__(self) -> None:
        if self.sm_count <= 0 or self.blocks_per_sm <= 0:
            raise ValueError("sm_count and blocks_per_sm must be positive")
        if self.min_chunk_tokens <= 0 or self.max_chunks <= 0:
            raise ValueError("min_chunk_tokens and max_chunks must be positive")
        if self.fused_max_bytes < 0 or self.fused_max_chunks < 0:
            raise ValueError("fused_max_bytes and fused_max_chunks must be >= 0")


DEFAULT_PARAMS = PlanParams()


def ctx_bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def plan_chunks(batch: int, head_blocks: int, params: PlanParams = DEFAULT_PARAMS) -> int:
    """The grid's chunks for ``batch`` sequences of ``head_blocks`` GPU blocks per chunk:
    one whole wave of resident blocks (a partial last wave would idle SMs), at most
    ``max_chunks``; the same for every context length (module docstring)."""
    if batch <= 0 or head_blocks <= 0:
        raise ValueError("batch and head_blocks must be positive")
    want = math.floor(params.sm_count * params.blocks_per_sm / (batch * head_blocks))
    return max(1, min(want, params.max_chunks))


def min_pages(params: PlanParams, block_size: int) -> int:
    """The fewest pages of a chunk a sequence splits into: ``min_chunk_tokens`` in blocks."""
    return max(1, params.min_chunk_tokens // block_size)


def chunk_spans(length: int, chunks: int, pages: int, block_size: int) -> list[range]:
    """The token ranges of a ``length``-token sequence's ``chunks`` grid chunks with at
    least ``pages`` pages each (the kernels' ``chunk_span``; empty ranges are chunks the
    sequence leaves unused)."""
    n = -(-length // block_size)
    used = max(1, min(chunks, n // pages))
    per = -(-n // used) * block_size
    return [range(min(c * per, length), min(c * per + per, length)) for c in range(chunks)]


def plan_fused(batch: int, max_len: int, kv_heads: int, head_dim: int, itemsize: int,
               params: PlanParams = DEFAULT_PARAMS, chunks: int = 1) -> bool:
    """Whether a step of ``batch`` sequences (the longest ``max_len`` tokens, rounded up to
    a power of two) in a grid of ``chunks`` chunks merges them in the main launch: K and V
    bytes read per layer at most ``params.fused_max_bytes`` and at most
    ``params.fused_max_chunks`` chunks."""
    kv_bytes = 2 * batch * ctx_bucket(max_len) * kv_heads * head_dim * itemsize
    return kv_bytes <= params.fused_max_bytes and chunks <= params.fused_max_chunks

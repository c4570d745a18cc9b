"""Frozen configuration of the engine, built at the edge (CLI, tests), validated here."""

from __future__ import annotations

from dataclasses import dataclass

KV_DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class CacheConfig:
    """KV cache shape and budget.

    ``kv_budget_bytes`` caps the pool (K and V, all layers); it grows a slab of ``slab_tokens``
    tokens at a time, starting at ``initial_slabs``. ``slab_tokens`` of None:
    ``auto_slab_tokens`` (the budget in at most AUTO_MAX_SLABS slabs). ``dtype`` of None
    uses the model's K/V dtype; one of KV_DTYPES otherwise ("int8": symmetric int8 with a
    float16 scale per token and kv head, kvcache/quant.py). ``prefix_caching``: full blocks
    stay cached by their tokens after their sequences end and later prompts that start with
    the same tokens reuse them (kvcache/prefix.py, scheduler/prefix.py).  ``preallocate``:
    the whole budget is allocated at start-up (``initial_slabs`` ignored) and, without
    ``slab_tokens``, in the fewest slabs whose per-layer arrays hold at most
    MAX_SLAB_ELEMENTS elements (``whole_pool_slab_blocks``: one slab for most pools), as
    vLLM allocates its KV cache: the pool never changes shape while serving, so compiled
    decode step graphs, whose signature holds the slabs, see one pool."""

    block_size: int = 16
    slab_tokens: int | None = None
    kv_budget_bytes: int = 1 << 30
    initial_slabs: int = 1
    dtype: str | None = None
    prefix_caching: bool = True
    preallocate: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        st = self.slab_tokens
        if st is not None and (st < self.block_size or st % self.block_size):
            raise ValueError("slab_tokens must be a positive multiple of block_size")
        if self.dtype is not None and self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(KV_DTYPES)}, not {self.dtype!r}")
        if self.kv_budget_bytes <= 0 or self.initial_slabs < 1:
            raise ValueError("kv_budget_bytes and initial_slabs must be positive")

    def slab_blocks(self, token_bytes: int, scale_bytes: int | None = None) -> int:
        """Blocks per slab for a model whose K and V values take ``token_bytes`` per token.

        An automatic int8 slab is sized in bytes: the bytes of the 16-bit pool's automatic
        slab (values of 2 bytes), filled with int8 tokens of ``token_bytes`` plus their
        scales, ``scale_bytes`` per token (None: one float16 scale per 64 values, exact
        for head_dim 64 and a slab 1.5% short at 128).  Both pools then hold the same
        number of whole slabs of a budget, the int8 one 1.94x the blocks (head_dim 64;
        whole-slab rounding of equal token counts gave 1.875x at 1 GiB for Llama-3.2-1B,
        docs/benchmarks/kv-int8.md)."""
        if self.slab_tokens:
            return max(1, self.slab_tokens // self.block_size)
        if self.dtype != "int8":
            return max(1, auto_slab_tokens(self.kv_budget_bytes, token_bytes) // self.block_size)
        wide = 2 * token_bytes  # the 16-bit pool's bytes per token
        slab = auto_slab_tokens(self.kv_budget_bytes, wide) * wide
        per = token_bytes + (token_bytes // 32 if scale_bytes is None else scale_bytes)
        return max(1, slab // per // self.block_size)

    def whole_pool_slab_blocks(self, block_bytes: int, block_elements: int) -> int:
        """Blocks per slab of a preallocated pool without ``slab_tokens``: the budget's
        blocks (``block_bytes`` each, K and V of every layer) in the fewest slabs whose
        per-layer, per-side array of ``block_elements`` elements a block stays within
        MAX_SLAB_ELEMENTS."""
        blocks = max(1, self.kv_budget_bytes // block_bytes)
        slabs = max(1, -(-blocks * block_elements // MAX_SLAB_ELEMENTS))
        return max(1, blocks // slabs)


MAX_SLAB_ELEMENTS = 1 << 30  # 2 GiB of a 16-bit slab array: int32 element offsets stay exact
AUTO_MAX_SLABS = 32
AUTO_MIN_SLAB_TOKENS = 4096


def auto_slab_tokens(budget_bytes: int, token_bytes: int) -> int:
    """Default slab size: the power of two of tokens, at least AUTO_MIN_SLAB_TOKENS, that
    holds the whole budget in at most AUTO_MAX_SLABS slabs.  Every slab is an input of the
    CUDA decode kernel, which is built once for up to 32 (attention/cuda_source.py), and
    each slab a step touches costs a take or a scatter per layer: a GPU load test with
    4096-token slabs grew past 32 slabs mid-run and stalled on a rebuild (docs/adr/0006)."""
    need = -(-budget_bytes // (max(1, token_bytes) * AUTO_MAX_SLABS))
    return max(AUTO_MIN_SLAB_TOKENS, 1 << max(0, need - 1).bit_length())


@dataclass(frozen=True)
class RunnerConfig:
    """Model runner settings, resolved at the edge (flags and environment are read there).

    ``prefill_kv_bucket``: prefill attention's shape bucket in tokens (0 = exact shapes;
    None = ``attention.prefill.default_bucket()``, the device's default).
    ``dispatch_every``: hand the forward's graph to the device every this many layers while
    the host builds the rest (0 = one evaluation per step).  ``host_math``: float32 prefill
    softmax and SiLU in numpy on CPU (attention/host_math.py; it still applies only where
    it can).  ``linear_layout``: float32 Linear weights stored transposed on CPU
    (engine/linear_layout.py), applied to the runner's model when the runner starts.
    ``compile_decode``: decode forwards run each layer as compiled stages around the paged
    cache (engine/staged.py; the server turns it on on a GPU unless ``--enforce-eager``);
    False runs every layer's Python each step.  ``step_graph``: with ``compile_decode``,
    a model whose layers all have fused stages (the llama family) runs each decode step as
    one compiled graph (engine/step_graph.py) where every layer's path can be traced.
    ``capture_max_batch``: with ``compile_decode``, the serving process runs throwaway
    decode steps at start-up for batches up to this size (``ModelRunner.capture_decode``),
    so their graphs are traced and kernels compiled before the first request; 0 = none.
    ``max_context``: the longest sequence the server admits (the scheduler's), which sizes
    step graphs' device block table (kvcache/device_table.py); None: the pool's blocks.
    ``rows_matmul``: with ``compile_decode``, fused projections of 2-16 rows run as the
    few-rows CUDA kernel (engine/rows_matmul.py) where it applies and its start-up probe
    passes; MLX's matmul otherwise (``serve --rows-matmul``; off by default: on an H100
    its steps were 0.94x at 4 streams and 1.04x at 8, docs/benchmarks/loadtest-gpu.md).
    ``inplace_kv_writes``: every forward on CUDA (step graphs, prefill chunks, staged
    decode steps) writes K/V into the pool's own buffers with a kernel
    (kvcache/inplace.py) where its start-up probe passes, instead of MLX scatters, which
    copy a whole slab whenever the step before still holds it (async scheduling), and on
    CUDA even when it does not (docs/adr/0014-inplace-kv-writes.md)."""

    prefill_kv_bucket: int | None = None
    dispatch_every: int = 0
    host_math: bool = True
    linear_layout: bool = True
    compile_decode: bool = False
    step_graph: bool = True
    capture_max_batch: int = 0
    max_context: int | None = None
    rows_matmul: bool = False
    inplace_kv_writes: bool = True

    def __post_init__(self) -> None:
        if self.prefill_kv_bucket is not None and self.prefill_kv_bucket < 0:
            raise ValueError("prefill_kv_bucket must be >= 0")
        if self.dispatch_every < 0:
            raise ValueError("dispatch_every must be >= 0")
        if self.capture_max_batch < 0:
            raise ValueError("capture_max_batch must be >= 0")
        if self.max_context is not None and self.max_context <= 0:
            raise ValueError("max_context must be positive")

"""The paged model runner: chunked prefill and ragged batched decode of any mlx-lm model
whose attention goes through mlx-lm's cache protocol and SDPA function.

The runner owns the slab pool (MLX memory) and creates the block allocator that feeds
it; who allocates blocks (the scheduler, or ``engine.generate`` in tests) passes plain
block tables in.  ``forward`` hands the step to the device: outputs and every slab
written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from slabserve.attention import AttentionRuntime, DecodeBatch, HostMath, Selector
from slabserve.attention.prefill import default_bucket
from slabserve.engine import linear_layout as linear_layout_mod
from slabserve.engine import patch
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.paged_cache import ForwardContext, PagedLayerCache
from slabserve.engine.rows_matmul import RowsMatmul
from slabserve.engine.staged import stage_layers
from slabserve.engine.step_graph import StepGraphs, batch_bucket, query_dtype
from slabserve.kvcache import BlockAllocator, PoolGeometry, SlabPool, blocks_needed
from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.inplace import InPlaceWritePlan, InPlaceWriter
from slabserve.kvcache.pool import WritePlan
from slabserve.kvcache.quant import SCALE_DTYPE, is_quantized

log = logging.getLogger("slabserve.engine")

# Architectures whose forward is ``model.model(inputs, cache)`` then a head, so prefill
# can skip the LM head for all but the last position.  Others run the full model.
_HEAD_SPLIT = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"}


@dataclass
class SeqInput:
    """One sequence's part of a forward pass: ``tokens`` at positions
    ``[start, start + len(tokens))``, its block table (covering all those positions),
    and whether the logits of its last token are wanted."""

    tokens: list[int]
    start: int
    blocks: list[int]
    want_logits: bool = True


class _Probe:
    """A throwaway cache that records each layer's K shape and dtype."""

    offset = 0

    def __init__(self) -> None:
        self.seen: tuple | None = None

    def update_and_fetch(self, k, v):
        self.seen = (k.shape[1], k.shape[3], v.shape[3], k.dtype)
        return k, v

    def make_mask(self, *args, **kwargs):
        return None


def probe_geometry(model: nn.Module) -> tuple[int, int, mx.Dtype]:
    """(kv_heads, head_dim, dtype) shared by every layer, from a one-token forward."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = {type(c) for c in make_prompt_cache(model)}
    if kinds != {KVCache}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise ValueError(f"unsupported cache kinds for paging: {names} (need KVCache only)")
    probes = [_Probe() for _ in make_prompt_cache(model)]
    mx.eval(model(mx.array([[0]]), cache=probes))
    seen = {p.seen for p in probes}
    if len(seen) != 1 or None in seen:
        raise ValueError(f"layers differ in K/V shape ({seen}); paging needs one geometry")
    kvh, dk, dv, dtype = seen.pop()
    if dk != dv:
        raise ValueError(f"K head_dim {dk} != V head_dim {dv}; not supported")
    return kvh, dk, dtype


class ModelRunner:
    # ``forward`` takes decode tokens as a device array (async scheduling's inputs)
    device_tokens = True

    def __init__(
        self, model: nn.Module, cache_cfg: CacheConfig, cfg: RunnerConfig | None = None,
        selector: Selector | None = None,
    ) -> None:
        """``cfg``: runner settings (default ``RunnerConfig()``); ``selector``: the decode
        path selector this runner's attention uses (default: auto, no profile).  The
        runner owns its ``AttentionRuntime`` (``self.attention``): selector, prefill
        bucket, host math."""
        cfg = cfg or RunnerConfig()
        self.model = model
        self.linear_layout = linear_layout_mod.apply(model, cfg.linear_layout)
        bucket = default_bucket() if cfg.prefill_kv_bucket is None else cfg.prefill_kv_bucket
        self.attention = AttentionRuntime(selector or Selector(), bucket,
                                          HostMath(cfg.host_math))
        self.merge_prefills = True  # equally long chunks share a forward (_prefill_rows)
        # evaluate each forward of a step (and its K/V writes) before building the next:
        # a sharded model's all-sums then run in one order on every rank (engine/distributed)
        self.eval_each_forward = False
        # > 0: hand the graph to the device every this many layers while building the rest
        # (``mx.async_eval``), so host building overlaps device work; 0 = one eval per step
        self.dispatch_every = cfg.dispatch_every
        self.model_type = getattr(getattr(model, "args", None), "model_type", "")
        self.patched_modules = patch.install(model)
        kvh, head_dim, dtype = probe_geometry(model)
        num_layers = len(model.layers)
        if cache_cfg.dtype is not None:
            dtype = getattr(mx, cache_cfg.dtype)
        # a quantized pool adds one scale per token and kv head (kvcache/quant.py)
        scales = 2 * num_layers * kvh * SCALE_DTYPE.size if is_quantized(dtype) else 0
        if cache_cfg.preallocate and not cache_cfg.slab_tokens:
            one = PoolGeometry(num_layers, kvh, head_dim, cache_cfg.block_size, 1, dtype)
            slab_blocks = cache_cfg.whole_pool_slab_blocks(
                one.block_bytes, kvh * cache_cfg.block_size * head_dim)
        else:
            slab_blocks = cache_cfg.slab_blocks(
                2 * num_layers * kvh * head_dim * dtype.size, scales)
        self.geom = PoolGeometry(
            num_layers, kvh, head_dim, cache_cfg.block_size, slab_blocks, dtype
        )
        max_slabs = self.geom.slabs_for_budget(cache_cfg.kv_budget_bytes)
        self.pool = SlabPool(self.geom, max_slabs=max_slabs)
        self.allocator = BlockAllocator(
            slab_blocks,
            max_slabs * slab_blocks,
            initial_slabs=max_slabs if cache_cfg.preallocate else cache_cfg.initial_slabs,
            on_grow=self.pool.grow,
            enable_caching=cache_cfg.prefix_caching,
        )
        self.caches = [PagedLayerCache(i) for i in range(num_layers)]
        self.max_context = cfg.max_context
        self.last_build_s = 0.0
        # decode forwards replay compiled per-layer stages (engine/staged.py), and where
        # every layer has fused stages one compiled graph per step (engine/step_graph.py)
        rows = _rows_matmul(cfg)
        self.compile_decode = cfg.compile_decode and stage_layers(model, rows) > 0
        # K/V written in place on CUDA by every forward (kvcache/inplace.py)
        self.inplace_writer = _inplace_writer(cfg, self.pool) if self.compile_decode else None
        self.step_graphs = (self._step_graphs(self.inplace_writer)
                            if self.compile_decode else None)
        self.step_graph = cfg.step_graph and self.step_graphs is not None
        # what was built lazily (fused weights, the pool's slabs, the device block table)
        # is evaluated on this thread's stream now: MLX streams belong to the thread that
        # made them, and another thread (the serving loop's engine) steps this runner
        tables = [] if self.step_graphs is None else [self.step_graphs.tables.array]
        mx.eval(self.model.parameters(), self.pool.arrays(), tables)

    def _step_graphs(self, writer: InPlaceWriter | None) -> StepGraphs | None:
        layers = self.model.layers
        fused = [getattr(layer, "fused", None) for layer in layers]
        if None in fused or not hasattr(getattr(self.model, "model", None), "embed_tokens"):
            return None
        if len({(f.heads, f.scale) for f in fused}) != 1:
            return None
        width = blocks_needed(self.longest_sequence, self.geom.block_size)
        return StepGraphs(self._build, self.pool, self.attention, len(layers), fused[0].heads,
                          query_dtype(self.model, layers[0]), fused[0].scale, width,
                          writer=writer)

    @property
    def block_size(self) -> int:
        return self.geom.block_size

    @property
    def longest_sequence(self) -> int:
        """Tokens of the longest sequence this runner serves: ``max_context``, at most the
        pool's capacity (the capacity when ``max_context`` is unset)."""
        capacity = self.allocator.max_blocks * self.geom.block_size
        return capacity if self.max_context is None else min(self.max_context, capacity)

    @property
    def graph_traces(self) -> int:
        """Decode step graphs traced so far (0 without step graphs)."""
        return 0 if self.step_graphs is None else self.step_graphs.traces

    # ---- one forward ---------------------------------------------------------------
    def _run(self, inputs: mx.array, ctx: ForwardContext, head_rows: slice | None):
        out = self._build(inputs, ctx, head_rows)
        if self.eval_each_forward:
            mx.eval([] if out is None else out, self.pool.take_pending())
        return out

    def _build(self, inputs: mx.array, ctx: ForwardContext, head_rows: slice | None):
        every, n = self.dispatch_every, len(self.caches)
        if ctx.graph_paths is not None:  # traced into a step graph: nothing evaluated
            every = 0
        for c in self.caches:
            c.ctx = ctx
            c.dispatch = every > 0 and (c.layer + 1) % every == 0 and c.layer + 1 < n
        # compiled stages are traced, never run on the host's numpy path
        host = None if ctx.staged else self.attention.host_math
        with patch.host_math_scope(self.patched_modules, host):
            # fused staged decode layers end on [B, hidden] (engine/fused.py): one row per
            # sequence, already the head's rows (no slice node)
            if head_rows is None or self.model_type not in _HEAD_SPLIT:
                out = self.model(inputs, cache=self.caches)
                if head_rows is None:
                    return None
                return out if out.ndim == 2 else out[:, head_rows, :]
            hidden = self.model.model(inputs, cache=self.caches)
            if hidden.ndim == 3:
                hidden = hidden[:, head_rows, :]
        if getattr(self.model, "lm_head", None) is not None:
            return self.model.lm_head(hidden)
        return self.model.model.embed_tokens.as_linear(hidden)

    def _slots(self, seq: SeqInput) -> list[tuple[int, int]]:
        bs = self.geom.block_size
        end = seq.start + len(seq.tokens)
        return [(seq.blocks[p // bs], p % bs) for p in range(seq.start, end)]

    def _prefix(self, seq: SeqInput) -> DecodeBatch | None:
        """The cached tokens a chunk attends to besides itself, with the chunk (None when
        it starts at position 0)."""
        if seq.start == 0:
            return None
        n = seq.start + len(seq.tokens)
        return DecodeBatch(self.geom, [seq.blocks[: blocks_needed(n, self.geom.block_size)]],
                           [n])

    def _writes(self, slots: list[tuple[int, int]]) -> WritePlan | InPlaceWritePlan:
        """A forward's K/V writes (prefill chunks, staged decode steps): in place where the
        runner has the kernel, as its step graphs write (on CUDA a scatter copies every
        slab it writes, ADR 0014; and a scatter of a slab that an in-place write of the
        same forward changed would not wait for that write), else scatters."""
        if self.inplace_writer is None:
            return WritePlan(self.geom, slots)
        return InPlaceWritePlan(self.geom, slots, self.inplace_writer)

    def _prefill(self, seq: SeqInput) -> mx.array | None:
        writes = self._writes(self._slots(seq))
        ctx = ForwardContext(self.pool, writes, seq.start, self.attention, None,
                             self._prefix(seq))
        rows = slice(-1, None) if seq.want_logits else None
        logits = self._run(host_array([seq.tokens]), ctx, rows)
        return None if logits is None else logits[0, -1]

    def _prefill_rows(self, seqs: list[SeqInput]) -> list[mx.array | None]:
        """Equally long chunks of several sequences as the rows of one forward (the layers
        run once on ``[rows, L]``; attention stays per row): a step's per-forward cost is
        mostly per op on a GPU, so two 2048-token chunks cost far less than two forwards."""
        slots = [slot for s in seqs for slot in self._slots(s)]
        offsets = host_array([s.start for s in seqs])
        ctx = ForwardContext(self.pool, self._writes(slots), offsets, self.attention,
                             None, None, tuple(self._prefix(s) for s in seqs))
        want = any(s.want_logits for s in seqs)
        logits = self._run(host_array([s.tokens for s in seqs]), ctx,
                           slice(-1, None) if want else None)
        return [logits[i, -1] if s.want_logits else None for i, s in enumerate(seqs)]

    def _prefills(self, seqs: list[SeqInput]) -> list[mx.array | None]:
        """Last-token logits (or None) per chunk, in order; chunks of equal length share
        one forward when ``merge_prefills`` is on."""
        if not self.merge_prefills:
            return [self._prefill(s) for s in seqs]
        out: list[mx.array | None] = [None] * len(seqs)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(len(s.tokens), []).append(i)
        for idx in groups.values():
            if len(idx) == 1:
                out[idx[0]] = self._prefill(seqs[idx[0]])
                continue
            for i, lg in zip(idx, self._prefill_rows([seqs[i] for i in idx]), strict=True):
                out[i] = lg
        return out

    def _decode(self, seqs: list[SeqInput], tokens: mx.array | None = None) -> mx.array:
        bs = self.geom.block_size
        slots, tables, lengths = [], [], []
        for s in seqs:
            if len(s.tokens) != 1:
                raise ValueError("decode takes exactly one new token per sequence")
            slots += self._slots(s)
            tables.append(s.blocks[: blocks_needed(s.start + 1, bs)])
            lengths.append(s.start + 1)
        batch = DecodeBatch(self.geom, tables, lengths)
        starts = [s.start for s in seqs]
        # host_array: a one-sequence batch's position and token are 4-byte arrays, which
        # MLX's CUDA allocator would put in its slow-to-read scalar pool (kvcache.arrays)
        inputs = host_array([s.tokens for s in seqs]) if tokens is None else tokens[:, None]
        if self.step_graph and self.compile_decode:  # the graph builds its own positions
            logits = self.step_graphs.run(inputs, starts, batch, slots)
            if logits is not None:
                return logits
        ctx = ForwardContext(self.pool, self._writes(slots), host_array(starts),
                             self.attention, batch, staged=self.compile_decode)
        logits = self._run(inputs, ctx, slice(-1, None))
        return logits if logits.ndim == 2 else logits[:, -1, :]

    def capture_decode(self, sizes: list[int]) -> int:
        """Run throwaway decode steps for each batch size in ``sizes`` so that compiled
        decode steps (step graphs, compiled stages) are traced and their kernels compiled
        before serving, as vLLM captures CUDA graphs at start-up; sizes beyond the free
        blocks are skipped.  Each size runs twice: every sequence one token at position 0,
        then at the last position of ``longest_sequence`` (where a step's merge form can
        differ, attention/cuda_plan.plan_fused), each sequence's table that one block
        repeated.
        Returns how many step graphs were traced.  The blocks used were free before and
        are free after; no other block is written."""
        fit = [b for b in sizes if b <= self.allocator.num_free_uncached]
        if not fit:
            return 0
        blocks = self.allocator.allocate(max(fit)) or []
        before = self.graph_traces
        if self.step_graphs is not None:
            self.step_graphs.tables.reserve(batch_bucket(max(fit)))
        bs = self.geom.block_size
        ends = sorted({1, self.longest_sequence})
        try:
            for b in fit:
                for n in ends:
                    seqs = [SeqInput([0], n - 1, [blk] * blocks_needed(n, bs))
                            for blk in blocks[:b]]
                    mx.eval(self.forward([], seqs)[1])
        finally:
            self.allocator.free(blocks)
        return self.graph_traces - before

    def forward(
        self, prefills: list[SeqInput], decodes: list[SeqInput],
        decode_tokens: mx.array | None = None,
    ) -> tuple[list[mx.array | None], mx.array | None]:
        """Run prefill chunks (one forward each) and one batched decode forward: returns
        (last-token logits per prefill or None, ``[B, vocab]`` decode logits or None).
        ``decode_tokens`` (``[B]`` int32, on the device: an earlier step's sampled tokens)
        replaces the decodes' host tokens when given (``device_tokens`` runners only).
        The step is handed to the device (``mx.async_eval``) with every slab it writes,
        not waited for: the caller builds on the logits (sampling) while it runs, and its
        first evaluation synchronises the whole step.  ``last_build_s``: the host's time
        building this step's graph."""
        t0 = time.perf_counter()
        pre = self._prefills(prefills)
        dec = self._decode(decodes, decode_tokens) if decodes else None
        self.last_build_s = time.perf_counter() - t0
        outs = [x for x in pre if x is not None] + ([dec] if dec is not None else [])
        mx.async_eval(outs, self.pool.take_pending())
        return pre, dec


def _inplace_writer(cfg: RunnerConfig, pool: SlabPool) -> InPlaceWriter | None:
    """The in-place K/V write kernel (every forward's writes; built only for a runner
    that compiles decode) when ``cfg`` asks for it, the device is a CUDA GPU and the
    kernel passes its probe for ``pool``'s geometry at the pool's slab count, and at two
    slabs where the pool may grow (the kernel differs by count: a pool allocated whole, a
    GPU's default, compiles one); None keeps MLX scatters."""
    if not (cfg.inplace_kv_writes and mx.cuda.is_available()
            and mx.default_device().type == mx.gpu):
        return None
    writer = InPlaceWriter()
    n = max(1, pool.num_slabs)
    grows = pool.max_slabs is None or n < pool.max_slabs
    reason = writer.probe(pool.geom, tuple(sorted({n, 2} if grows else {n})))
    if reason:
        log.warning("in-place KV writes declined (%s): step graphs write by scatter", reason)
        return None
    return writer


def _rows_matmul(cfg: RunnerConfig) -> RowsMatmul | None:
    """The few-rows projection kernel when ``cfg`` asks for it and it passes its probe."""
    if not (cfg.compile_decode and cfg.rows_matmul):
        return None
    rows = RowsMatmul()
    return None if rows.probe() else rows

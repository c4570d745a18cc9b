"""Native pooled decode on CUDA: reads K/V pages in place through ``mx.fast.cuda_kernel``.

Algorithm (attention/kernels/*.cu, docs/adr/0004-cuda-kernel.md): one GPU block per
(sequence, kv head, context chunk) covering all q heads of the kv group, 16-byte vector
loads, fp32 accumulation with an exp2 online softmax, and a log-sum-exp merge pass when the
host plan (attention/cuda_plan.py) splits the context into several chunks.  Products by FMA
or, for float16/bfloat16 with >= 6 q heads per kv head, by tensor cores (variant "auto";
choices and sources: attention/cuda_source.py).  An int8 pool (kvcache/quant.py) gets
the int8 kernel (kernels/pooled_decode_int8.cu): the same work split over int8 pages and
their float16 scale slabs, which are kernel inputs too (``ks0..``, ``vs0..``), read in
place; scales multiply score and probability columns.  Kernel experiments (other variants, ring
depths, timing marks) subclass this class from experiments/, not here.

Any slab count without copying: every slab of the layer is a kernel input (the count is
the power-of-two bucket of the most slabs the pool will hold, capped at 32, padded with
slab 0: one build for a growing pool); the kernel puts the slab pointers in a shared-memory
table and resolves block ``b`` to slab ``b // slab_blocks``.

Invariants: ``decline`` answers ``None`` only when the case's shape and dtypes are
supported and a probe of exactly the variants ``__call__`` will launch compiled, ran and
returned the right values on this device (at the scale ``1/sqrt(head_dim)``: another
scale changes only a float literal of the source); ``__call__`` never copies the pool.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.attention.cuda_plan import (
    DEFAULT_PARAMS,
    PlanParams,
    min_pages,
    plan_chunks,
    plan_fused,
)
from slabserve.attention.cuda_source import (
    COMMON_FILE,
    INT8_VARIANT,
    KERNEL_FILE,
    MAX_GROUP,
    MERGE_BODY,
    MMA_MAX_GROUP,
    REGISTER_VARIANT,
    SM_SMEM,
    STAGES,
    TENSOR_VARIANTS,
    THREADS,
    VARIANT_FILES,
    VARIANTS,
    case_variant,
    group_block,
    kernel_body,
    pool_slab_inputs,
    shape_decline,
    slab_literal,
    smem_bytes,
    unit_tokens,
)
from slabserve.attention.gather import gather_kv
from slabserve.attention.reference import random_pool
from slabserve.kvcache.pool import PoolGeometry, SlabPool


class NativeCUDA(DecodeAttention):
    """The native pooled decode path on MLX's CUDA backend.

    ``variant``: "auto" (default: "mma" for float16/bfloat16 with >= 6 q heads per kv
    head, else "lean" where it applies, else "async"; cuda_source.case_variant), or one of
    them forced for side-by-side tables: "mma" (tensor-core products for float16/bfloat16;
    other dtypes go to "async"), "lean" (FMA products, the row-group reduction through
    shared memory and one exp2 per score: 16-bit K/V, head_dim 64 with 2 or 4 q heads per
    kv head or 128 with 4, the slab size compiled in: one build per pool geometry; other
    cases go to "async"), "async" (FMA products, shuffle reduction); all three stream K/V
    through a cp.async ring of ``stages`` (STAGES) stages.  "sync" (REGISTER_VARIANT) is
    the register-load work split of a subclass's own kernel (NativeMetal): this class
    has no CUDA source for it.  ``fused_merge``: with several chunks
    the last block of each (sequence, heads) merges them (per-layer counters that the
    kernel resets) instead of a second launch.  ``None`` (default): per step, fused for
    layers reading at most ``params.fused_max_bytes`` of K/V in at most
    ``params.fused_max_chunks`` chunks (one launch less where the launches are the cost),
    split + merge otherwise and always for the tensor-core variant (cuda_plan.plan_fused;
    docs/adr/0004-cuda-kernel.md); ``True`` / ``False``: always / never.  Subclasses for
    other backends override ``threads``, ``kernel_file``, ``_device_reason``, ``_case``,
    ``_body``, ``_compile`` and ``quant_variants`` (the variants whose kernels take an int8
    pool's scale slabs); experiments may also set ``stages``."""

    name = "native"
    scale_input = False  # CUDA bodies carry the scale as a literal (cuda_source.kernel_body)
    threads = THREADS
    stages = STAGES
    kernel_file = KERNEL_FILE
    common_files: tuple[Path, ...] = (COMMON_FILE,)
    quant_variants: tuple[str, ...] = (INT8_VARIANT,)  # variants that take the scale slabs
    dep_input = True  # main launches take a ``dep`` input (kvcache/inplace.py's token)

    def __init__(self, params: PlanParams = DEFAULT_PARAMS, variant: str = "auto",
                 fused_merge: bool | None = None) -> None:
        if variant not in (*VARIANTS, REGISTER_VARIANT):
            raise ValueError(f"variant is one of {VARIANTS}")
        self.params = params
        self.variant = variant
        self.fused_merge = fused_merge
        self._counters: dict[int, mx.array] = {}
        self._kernels: dict[tuple[str, int, int, str], object] = {}
        self._probes: dict[tuple, str | None] = {}
        self._scales: dict[float, mx.array] = {}
        self._launches: dict[tuple, tuple] = {}
        self._headers: dict[str, str] = {}
        # the ``dep`` input of a launch with no in-place write before it (16 bytes: ADR 0010)
        self._no_dep = mx.zeros((4,), dtype=mx.int32)
        mx.eval(self._no_dep)

    # ---- decline ------------------------------------------------------------------------
    def decline(self, q: mx.array, pool: SlabPool, batch: DecodeBatch) -> str | None:
        reason = shape_decline(q.shape, q.dtype, pool.geom, pool.num_slabs)
        if reason:
            return reason
        reason = self._device_reason()
        if reason:
            return reason
        key = self._variant_key(q, pool)
        if key not in self._probes:
            self._probes[key] = self._probe(q, pool)
        return self._probes[key]

    def _device_reason(self) -> str | None:
        if not mx.cuda.is_available():
            return "no CUDA device (mx.cuda.is_available() is False)"
        if mx.default_device().type != mx.gpu:
            return f"default device is {mx.default_device()}, not the GPU"
        return None

    def _variant_key(self, q: mx.array, pool: SlabPool) -> tuple:
        g = pool.geom
        return (q.dtype, q.shape[1], g, pool_slab_inputs(pool))

    def _probe(self, q: mx.array, pool: SlabPool) -> str | None:
        """Run the direct and split variants that ``pool`` needs, with the live kernel's
        fewest pages a chunk (``MP``: ``mp`` below), on a private two-block pool of random
        pages (the live pool may still be zeros): one sequence of ``2 mp`` pages, the last
        slab's block and slab 0's in turn, the last page 3 tokens long, against SDPA in
        float32 on the gathered pages; split at 2 chunks (``mp`` pages each) and at 4 (the
        last two past the sequence's pages: the empty partials a short sequence leaves in a
        grid planned for longer ones).  Fixed random keys: the global random state is not
        touched.  The source's literals (the softmax scale; lean's slab size) take the
        probe's values, so the live kernel, which differs from the probed one only in them,
        compiles on first use."""
        g = pool.geom
        ns = pool_slab_inputs(pool)
        mp = min_pages(self._plan_params(q, g), g.block_size)
        geom = PoolGeometry(1, g.kv_heads, g.head_dim, g.block_size, 2, g.dtype)
        probe_pool = random_pool(geom, ns, mx.random.key(7))
        n = (2 * mp - 1) * g.block_size + 3
        batch = DecodeBatch(geom, [[2 * ns - 1, 0] * mp], [n])
        q1 = mx.random.normal((1, q.shape[1], 1, g.head_dim), key=mx.random.key(8))
        scale = 1.0 / math.sqrt(g.head_dim)
        k, v = (x[:, :, :n].astype(mx.float32)
                for x in gather_kv(probe_pool, 0, batch, mx.float32))
        want = mx.fast.scaled_dot_product_attention(
            q1.astype(q.dtype).astype(mx.float32), k, v, scale=scale)
        tol = 2e-2 * (1.0 + mx.max(mx.abs(want)).item())
        fused = (False, True) if self.fused_merge is None else (self.fused_merge,)
        try:
            for chunks, f in [(1, False), *((c, f) for c in (2, 4) for f in fused)]:
                got = self._run(q1.astype(q.dtype), probe_pool, 0, batch, scale, chunks, f,
                                mp)
                err = mx.max(mx.abs(got.astype(mx.float32) - want)).item()
                if not err <= tol:
                    return (f"probe ({chunks} chunk(s){', fused' if f else ''}) wrong: "
                            f"max error {err:.3g}")
        except Exception as e:  # compile or launch failure: fall back with the reason
            return f"kernel failed: {type(e).__name__}: {str(e)[:300]}"
        return None

    # ---- run ----------------------------------------------------------------------------
    def __call__(self, q, pool, layer, batch, scale):
        return self._execute(self._step_launch(q, pool, batch, scale)[1], q, pool, layer,
                             batch, scale)

    def graph_key(self, q, pool: SlabPool, batch: DecodeBatch, scale: float,
                  layers: int) -> tuple:
        """What a layer's launch this step depends on besides its inputs' shapes (variant,
        chunk count, merge form, slab inputs), so a compiled step graph traced through
        ``__call__`` is reused only where it would launch the same; the fused merge's
        counters of ``layers`` layers are made here, outside any trace.  ``q`` needs only
        ``shape`` and ``dtype``."""
        key, (_, main, merge) = self._step_launch(q, pool, batch, scale)
        if merge == "fused":
            for layer in range(layers):
                self._counter(layer, batch.batch * main[1]["grid"][0] // self.threads)
        return key

    def _step_launch(self, q, pool, batch, scale) -> tuple:
        """(launch key, launch) of this step: the plan and launch arguments are shared by
        every layer of a step."""
        key = (self, q.shape, q.dtype, pool.num_slabs, scale)
        found = batch._cache.get(key)
        if found is None:
            params = self._plan_params(q, pool.geom)
            chunks = plan_chunks(batch.batch, self._head_blocks(q, pool.geom), params)
            found = batch._cache[key] = self._launch_for(
                q, pool, chunks, self._fused(batch, pool.geom, params, chunks), scale,
                min_pages(params, pool.geom.block_size))
        return found

    def _fused(self, batch: DecodeBatch, g: PoolGeometry, params: PlanParams,
               chunks: int) -> bool:
        """Whether a launch of ``chunks`` grid chunks merges them itself: ``fused_merge``
        when given, else by the case's plan (``_plan_params``, cuda_plan.plan_fused)."""
        if self.fused_merge is not None:
            return self.fused_merge
        return plan_fused(batch.batch, batch.max_len, g.kv_heads, g.head_dim, g.dtype.size,
                          params, chunks)

    def _case(self, q: mx.array, g: PoolGeometry) -> tuple[str, int]:
        """(variant, q heads per GPU block) for a case."""
        grp = q.shape[1] // g.kv_heads
        variant = case_variant(self.variant, q.dtype, g.dtype, grp, g.head_dim)
        return variant, group_block(grp, MMA_MAX_GROUP if variant in TENSOR_VARIANTS
                                    else MAX_GROUP)

    def _head_blocks(self, q: mx.array, g: PoolGeometry) -> int:
        grp = q.shape[1] // g.kv_heads
        return g.kv_heads * (grp // self._case(q, g)[1])

    def _plan_params(self, q: mx.array, g: PoolGeometry) -> PlanParams:
        """The case's plan: resident blocks per SM, the plan's (4 blocks of 128 threads:
        registers) scaled to the block size and capped by shared memory; and for the
        tensor-core variant no fused merge (``fused_max_chunks`` 0: its fused kernel
        measured 1.1-8.6x slower than split + merge at every chunk count)."""
        variant, gb = self._case(q, g)
        smem = smem_bytes(variant, g.dtype.size, g.head_dim, gb, unit_tokens(gb, variant),
                          self.stages, self.threads)
        per_sm = self.params.blocks_per_sm * THREADS / self.threads
        if smem:
            per_sm = min(per_sm, SM_SMEM // (smem + 1024))
        per_sm = max(1.0, float(per_sm))
        if variant == "mma":
            return replace(self.params, blocks_per_sm=per_sm, fused_max_chunks=0)
        if per_sm == self.params.blocks_per_sm:
            return self.params
        return replace(self.params, blocks_per_sm=per_sm)

    def _run(self, q, pool, layer, batch, scale, chunks: int,
             fused: bool | None = None, pages: int = 1) -> mx.array:
        """One layer with a given chunk count (the plan bypassed: probes, tests, sweeps),
        each sequence split into up to ``chunks`` chunks of at least ``pages`` pages;
        ``fused`` None: as ``__call__`` would decide for this batch."""
        if fused is None:
            fused = self._fused(batch, pool.geom, self._plan_params(q, pool.geom), chunks)
        return self._execute(self._launch_for(q, pool, chunks, fused, scale, pages)[1], q,
                             pool, layer, batch, scale)

    def _launch_for(self, q: mx.array, pool: SlabPool, chunks: int, fused: bool,
                    scale: float, pages: int) -> tuple:
        """(key, launch): the launch of a chunk count, merge form and fewest pages a
        chunk, built once per key."""
        ns = pool_slab_inputs(pool)
        fused = fused and chunks > 1  # one chunk: the direct kernel either way
        key = (q.shape, q.dtype, pool.geom, ns, chunks, fused, scale, pages)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = (
                ns, *self._launch(q, pool.geom, ns, chunks, fused, scale, pages))
        return key, launch

    def _execute(self, launch: tuple, q, pool, layer, batch, scale) -> mx.array:
        b = q.shape[0]
        ns, main, merge = launch
        ks, vs = pool.k[layer], pool.v[layer]
        pad = ns - len(ks)
        if pad:
            ks, vs = [*ks, *([ks[0]] * pad)], [*vs, *([vs[0]] * pad)]
        # q goes in as [B, hq, 1, d] and outputs come out in that shape (same layout): a
        # reshape on either side would be one more graph node per layer for the host
        inputs = [q, batch.table_array, batch.lengths_array,
                  *([self._scale(scale)] if self.scale_input else []), *ks, *vs]
        if pool.geom.quantized:  # the scale slabs, padded like the value slabs
            kss, vss = pool.k_scale[layer], pool.v_scale[layer]
            inputs += [*kss, *([kss[0]] * pad), *vss, *([vss[0]] * pad)]
        if merge == "fused":
            inputs.append(self._counter(layer, b * main[1]["grid"][0] // self.threads))
        if self.dep_input:  # this layer's in-place K/V write's token (kvcache/inplace.py)
            inputs.append(pool.deps.get(layer, self._no_dep))
        if merge == "fused":
            return main[0](inputs=inputs, **main[1])[2]
        outs = main[0](inputs=inputs, **main[1])
        if merge is None:
            return outs[0]
        return merge[0](inputs=outs, **merge[1])[0]

    def _counter(self, layer: int, n: int) -> mx.array:
        """Zeroed int32 chunk counters of ``layer`` (at least ``n``); the fused kernel
        leaves them zero.  One array per layer: layers of a step run one after another,
        so no two launches in flight share one."""
        arr = self._counters.get(layer)
        if arr is None or arr.size < n:
            arr = self._counters[layer] = mx.zeros((1 << max(0, (n - 1).bit_length()),),
                                                   dtype=mx.int32)
            mx.eval(arr)
        return arr

    def _launch(self, q: mx.array, g: PoolGeometry, ns: int, chunks: int, fused: bool,
                scale: float, pages: int):
        """(kernel, kwargs) of the main launch and of the merge: None with one chunk,
        "fused" when the main launch merges.  ``pages``: the template's ``MP``, the fewest
        pages of a chunk (cuda_plan.min_pages)."""
        b, hq, _, d = q.shape
        grp = hq // g.kv_heads
        variant, gb = self._case(q, g)
        unit = unit_tokens(gb, variant)
        tmpl = [
            ("TQ", q.dtype), ("T", g.dtype), ("D", d), ("BS", g.block_size),
            ("HKV", g.kv_heads), ("G", grp), ("GB", gb), ("NS", ns), ("U", unit),
            ("NT", self.threads), ("ST", self.stages), ("MP", pages),
        ]
        smem = smem_bytes(variant, g.dtype.size, d, gb, unit, self.stages, self.threads)
        nt = self.threads
        sb = slab_literal(variant, g.slab_blocks)
        common = dict(template=tmpl, grid=(g.kv_heads * (grp // gb) * nt, chunks, b),
                      threadgroup=(nt, 1, 1))
        if chunks == 1:
            return (self._kernel("direct", ns, smem, variant, scale, sb),
                    dict(output_shapes=[(b, hq, 1, d)], output_dtypes=[q.dtype], **common)), None
        if fused:
            main = (self._kernel("fused", ns, smem, variant, scale, sb),
                    dict(output_shapes=[(b * hq * chunks, d), (b * hq, chunks), (b, hq, 1, d)],
                         output_dtypes=[mx.float32, mx.float32, q.dtype], **common))
            return main, "fused"
        main = (self._kernel("split", ns, smem, variant, scale, sb),
                dict(output_shapes=[(b * hq * chunks, d), (b * hq, chunks)],
                     output_dtypes=[mx.float32, mx.float32], **common))
        merge = (self._kernel("merge", 0, 0, variant),
                 dict(template=[("TQ", q.dtype), ("D", d)], grid=(b * hq * d, 1, 1),
                      threadgroup=(d, 1, 1), output_shapes=[(b, hq, 1, d)],
                      output_dtypes=[q.dtype]))
        return main, merge

    def _scale(self, scale: float) -> mx.array:
        arr = self._scales.get(scale)
        if arr is None:
            arr = self._scales[scale] = mx.array([scale], dtype=mx.float32)
        return arr

    def _header(self, variant: str) -> str:
        if variant not in self._headers:
            files = [*self.common_files, self.kernel_file, *VARIANT_FILES.get(variant, ())]
            self._headers[variant] = "\n".join(f.read_text() for f in files)
        return self._headers[variant]

    def _kernel(self, kind: str, ns: int, smem: int, variant: str, scale: float = 1.0,
                sb: int = 0):
        """The compiled kernel of a kind; the main kinds per softmax ``scale`` (a literal
        of their source: one model, one scale) and, with ``sb`` > 0, per slab size."""
        key = (kind, ns, smem, variant, None if kind == "merge" else scale, sb)
        if key not in self._kernels:
            header = self._header(variant)
            if kind == "merge":
                names, outs = ["opart", "lse"], ["out"]
            else:
                slabs = [f"k{i}" for i in range(ns)] + [f"v{i}" for i in range(ns)]
                if variant in self.quant_variants:
                    slabs += [f"ks{i}" for i in range(ns)] + [f"vs{i}" for i in range(ns)]
                scalar = ["qscale"] if self.scale_input else []
                names = ["q", "table", "lengths", *scalar, *slabs]
                names += ["counters"] if kind == "fused" else []
                # unread: orders the launch after the layer's in-place write (CUDA only)
                names += ["dep"] if self.dep_input else []
                outs = {"direct": ["out"], "split": ["opart", "lse"],
                        "fused": ["opart", "lse", "out"]}[kind]
            body = self._body(kind, ns, variant, scale, sb)
            # MLX caches compiled kernels on disk by name: name the source's hash too.
            tag = hashlib.sha1((header + body).encode()).hexdigest()[:10]
            self._kernels[key] = self._compile(
                f"slabserve_pooled_{kind}_ns{ns}_{tag}", names, outs, body, smem, header)
        return self._kernels[key]

    def _body(self, kind: str, ns: int, variant: str, scale: float = 1.0, sb: int = 0) -> str:
        if kind == "merge":
            return MERGE_BODY
        return kernel_body(ns, kind, variant, scale, sb)

    def _compile(self, name: str, names: list, outs: list, body: str, smem: int,
                 header: str):
        return mx.fast.cuda_kernel(name=name, input_names=names, output_names=outs,
                                   source=body, header=header, shared_memory=smem)

"""Whole decode steps as one compiled graph: embedding, every layer's stages, K/V writes
and decode attention, final norm and head in one ``mx.compile``d function per step
signature.

With compiled layer stages (engine/staged.py) a GPU decode step still ran ~70 us of Python
per layer around them (the K/V write, the selector, the kernel call: ~1.1 ms of a 3.1 ms
Llama-3.2-1B step at B=1, docs/adr/0012-decode-step-host-cost.md).  Here the host decides
what the Python would decide (each layer's path, the kernel launch's plan, where the new
tokens go) and replays a graph traced once through the same code with those decisions;
what changes from step to step is an input:

- ``tokens [B, 1]``, ``offsets [B]`` (RoPE positions), the block table (kept on the
  device at a fixed shape and updated by the cells that changed: kvcache/device_table.py;
  the graph reads its first ``B`` rows), ``lengths [B]``, the write plan's one index array
  (kvcache/spread.py: one write of every new row per slab touched), and every slab of the
  pool (``SlabPool.arrays``), with ``B`` padded to a bucket (``batch_bucket``: 1, 2, 4, 8,
  then multiples of 8) by copies of the first sequence that attend to one token, whose K/V
  writes put the first sequence's own values and whose logits are dropped;
- outputs: the logits ``[B, vocab]`` and, where K/V are written by MLX scatters, the slabs
  the step wrote, which the pool adopts.  On CUDA the writes are an in-place kernel
  (kvcache/inplace.py, ``writer``; one launch per layer, each layer's attention kernel
  taking its token): a scatter lands in place only where nothing else holds the slab, and
  with async scheduling the step before still does, so every scatter copied its slab.

The signature: bucketed batch size, the device table's shape, the slabs the step writes,
the pool's slab count, and each layer's path with the ``graph_key`` it gives (native CUDA:
variant, chunks, merge form).  None of these follows a sequence's length except the merge
form (attention/cuda_plan.py): with a pool allocated whole (one slab), a step at any
context replays a graph of its batch bucket that start-up capture traced.  A step whose
paths are not all graph-capable (gather-SDPA reads host-planned gathers), while the
selector writes a trace, or whose trace failed runs the staged layers as before.  A new
signature costs a trace (the forward's Python once, then MLX's compile): ``traces`` counts
them (/metrics ``decode_graph_traces_total``).

Invariants: a step graph computes what the staged step computes (the same stage functions,
writes and kernels, traced); the selector's decisions are taken and counted once per layer
and step, outside the trace; a signature's graph is reused only with equal host decisions.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from slabserve.attention import AttentionRuntime, DecodeBatch
from slabserve.engine.paged_cache import ForwardContext
from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.device_table import DeviceBlockTable
from slabserve.kvcache.inplace import InPlaceWritePlan, InPlaceWriter
from slabserve.kvcache.pool import SlabPool
from slabserve.kvcache.spread import SpreadWritePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuerySpec:
    """The shape and dtype of a layer's decode queries, all a path's plan reads of them."""

    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def batch_bucket(batch: int) -> int:
    """Rows a step graph runs for ``batch`` sequences: 1, 2, 4, 8, then multiples of 8 (a
    signature per bucket, not per batch size, as requests come and go)."""
    if batch <= 8:
        return 1 << max(0, batch - 1).bit_length()
    return -(-batch // 8) * 8


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes whose decode steps trace every step-graph signature of batches up to
    ``max_batch`` at one context: each bucket's full size (where it is at most
    ``max_batch``), and one size padded up to it (a padded batch writes through a row
    selection: a signature of its own).  vLLM's capture sizes follow the same pattern."""
    sizes: list[int] = []
    done = 0  # the largest batch whose bucket is covered
    while done < max_batch:
        bucket = batch_bucket(done + 1)
        if bucket - 1 > done:  # sizes done+1 .. bucket-1 pad to this bucket
            sizes.append(min(bucket - 1, max_batch))
        if bucket <= max_batch:
            sizes.append(bucket)
        done = bucket
    return sizes


class _Graph:
    """One signature's compiled function, which pool slabs its trace wrote, and while a
    step runs it the host tables and lengths the kernel's plan reads if MLX traces it
    (dropped after the step: a B=32 / 16k step's tables are ~32k Python ints)."""

    def __init__(self) -> None:
        self.fn = None
        self.written: list[tuple[int, int, int]] | None = None  # (layer, side, slab)
        self.seed: tuple[list, list] | None = None  # set by ``StepGraphs.run`` per step


class StepGraphs:
    """Compiled whole decode steps of one runner (module docstring).

    ``build(inputs, ctx, head_rows)`` is the runner's forward builder; ``heads`` /
    ``head_dim`` / ``dtype`` its layers' decode query shape; ``scale`` their softmax scale;
    ``table_width`` the most blocks a sequence holds (the device table's width).
    ``max_graphs`` signatures are kept (least recently used dropped).  ``writer``: the
    in-place K/V write kernel (kvcache/inplace.py), None for scatters."""

    def __init__(self, build, pool: SlabPool, runtime: AttentionRuntime, num_layers: int,
                 heads: int, dtype: mx.Dtype, scale: float, table_width: int,
                 max_graphs: int = 64, writer: InPlaceWriter | None = None) -> None:
        self._build = build
        self.pool = pool
        self.runtime = runtime
        self.num_layers = num_layers
        self.heads, self.dtype, self.scale = heads, dtype, scale
        self.max_graphs = max_graphs
        self.writer = writer  # in-place K/V writes (kvcache/inplace.py); None: scatters
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._failed: set[tuple] = set()
        self.traces = 0  # traces so far: a new signature, or a known one on a new stream
        self.tables = DeviceBlockTable(table_width)

    def run(self, inputs: mx.array, starts: list[int], batch: DecodeBatch,
            slots: list[tuple[int, int]]) -> mx.array | None:
        """The step's ``[B, vocab]`` logits from its graph, the pool's written slabs
        adopted; None (nothing run, nothing counted) where the step has no graph.
        ``inputs`` ``[B, 1]`` tokens, ``starts`` their positions; the batch is padded to
        ``batch_bucket(B)`` rows (copies of row 0 attending to one token, their writes
        token 0's own values)."""
        selector, pool = self.runtime.selector, self.pool
        b = batch.batch
        pad = batch_bucket(b) - b
        if pad:
            # extra rows attend to one token (their logits are dropped: no KV reads)
            batch = DecodeBatch(pool.geom, batch.tables + [batch.tables[0]] * pad,
                                batch.lengths + [1] * pad)
            starts, slots = starts + [starts[0]] * pad, slots + [slots[0]] * pad
        q = QuerySpec((batch.batch, self.heads, 1, pool.geom.head_dim), self.dtype)
        layer_slots = selector.plan_layers(q, pool, batch, self.num_layers)
        if layer_slots is None:
            return None
        paths = [s.impl for s in layer_slots]
        path_keys = {}
        for p in paths:
            if p not in path_keys:
                graph_key = getattr(p, "graph_key", None)
                if graph_key is None:
                    return None
                path_keys[p] = graph_key(q, pool, batch, self.scale, self.num_layers)
        writes = (SpreadWritePlan(pool.geom, slots, pad) if self.writer is None
                  else InPlaceWritePlan(pool.geom, slots, self.writer, pad))
        table = self.tables.update(batch.tables)
        key = (batch.batch, self.tables.shape, writes.key, pool.num_slabs, inputs.dtype,
               tuple(map(id, paths)), tuple(path_keys.values()))
        graph = self._graphs.get(key)
        if graph is None:
            if key in self._failed:
                return None
            graph = self._new_graph(key, writes, paths)
        else:
            self._graphs.move_to_end(key)
        if pad:
            inputs = mx.concatenate([inputs, mx.broadcast_to(inputs[:1], (pad, 1))])
        args = [inputs, host_array(starts), table, batch.lengths_array, writes.packed,
                *pool.arrays()]
        # what a trace reads on the host: MLX traces again where this thread's stream is not
        # the one it traced on (compiled functions are cached per default stream)
        graph.seed = (batch.tables, batch.lengths)
        try:
            outs = graph.fn(*args)
        except Exception as exc:  # a failed trace: this signature runs staged from now on
            del self._graphs[key]
            self._failed.add(key)
            log.warning("decode step graph failed to trace, running staged layers: %r", exc)
            return None
        del args  # the old slabs: referenced by the graph only, so written in place
        graph.seed = None
        pool.adopt(graph.written, outs[1:])
        selector.count_layers(layer_slots)
        return outs[0][:b] if pad else outs[0]

    def _new_graph(self, key: tuple, writes: SpreadWritePlan, paths: list) -> _Graph:
        graph = _Graph()
        pool, runtime, build = self.pool, self.runtime, self._build

        def step(inputs, offsets, table, lengths_arr, packed, *arrays):
            self.traces += 1
            view = pool.view(list(arrays))
            traced = DecodeBatch(pool.geom, *graph.seed)
            traced.__dict__.update(table_array=table[:traced.batch], lengths_array=lengths_arr)
            ctx = ForwardContext(view, writes.rebind(packed), offsets, runtime, traced,
                                 staged=True, graph_paths=paths)
            logits = build(inputs, ctx, slice(-1, None))
            written = view.written()
            graph.written = [key for key, _ in written]
            return [logits, *(arr for _, arr in written)]

        graph.fn = mx.compile(step)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


def query_dtype(model, layer) -> mx.Dtype:
    """The dtype of ``layer``'s (fused stages') decode queries for ``model``'s embedded
    tokens, read from a lazy graph that is never evaluated."""
    x = model.model.embed_tokens(mx.zeros((1, 1), dtype=mx.int32))
    return layer.fused.pre(x, mx.zeros((1,), dtype=mx.int32))[0].dtype


"""The slab pool: per layer and side (K, V), a list of slabs that only ever grows.

Layout (docs/adr/0001-slab-pool-layout.md): each slab is one contiguous mx.array viewed as
``[slab_blocks, kv_heads, block_size, head_dim]`` and stored flat as
``[slab_blocks * kv_heads * block_size, head_dim]`` so that new tokens are written with
one row scatter per slab.  Global block id ``b`` lives in slab ``b // slab_blocks`` at
local block ``b % slab_blocks``.  Growing appends slabs; old slabs are never copied.

Writes cost O(new tokens): MLX's scatter donates the slab's buffer when the slab array
is held by nothing but the pool, so the update happens in place (see
docs/adr/0001-slab-pool-layout.md).

Quantized pools (``dtype`` int8, kvcache/quant.py): every value slab has a float16 scale
slab of ``[rows, 1]`` with the same row addressing (``k_scale`` / ``v_scale``); a write
quantizes the new tokens and scatters values and scales with the same plan rows, and
``block_bytes`` counts the scales, so budgets and capacity stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.quant import SCALE_DTYPE, dequantize, is_quantized, quantize


@dataclass(frozen=True)
class PoolGeometry:
    """Shape of one pool.  ``dtype`` is an MLX dtype: float32, float16, bfloat16, or int8
    (quantized: values plus one float16 scale per token and kv head)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    slab_blocks: int
    dtype: mx.Dtype = mx.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim", "block_size", "slab_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)

    @property
    def token_head_bytes(self) -> int:
        """Bytes of one token of one kv head on one side: values, plus its scale."""
        scale = SCALE_DTYPE.size if self.quantized else 0
        return self.head_dim * self.dtype.size + scale

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K and V, all layers (scales included)."""
        per_side = self.kv_heads * self.block_size * self.token_head_bytes
        return 2 * self.num_layers * per_side

    @property
    def slab_bytes(self) -> int:
        """Bytes of one slab across all layers and both sides."""
        return self.block_bytes * self.slab_blocks

    def slabs_for_budget(self, budget_bytes: int) -> int:
        return max(1, budget_bytes // self.slab_bytes)


class WritePlan:
    """Where each of ``T`` new tokens goes, grouped by slab; shared by all layers.

    ``slots`` is a list of (global block id, row in block), one per token, in the order
    of the token axis of the K/V passed to ``SlabPool.write``.  A token's ``heads`` slab
    rows are flat: the update is written as ``[T * heads, head_dim]`` rows (one scatter
    whose index is one-dimensional: a ``[T, heads]`` index costs MLX two more graph nodes
    per scatter at T = 1).  Rows are ordered by slab (``perm``, None when they already
    are), so each slab's rows are one contiguous run ``[lo, hi)`` of the reordered update:
    ``groups`` holds ``(slab, lo, hi, rows)`` with ``rows`` the run's ``[hi - lo]`` slab
    rows.  The permutation and every group's rows are views of ONE host-built array: a
    step's writes cost one host-to-MLX transfer however many slabs they touch (each
    transfer cost 50-150 us inside a serving loop on an H100,
    docs/adr/0011-prefix-caching.md).

    One token (a one-sequence decode step): its rows are ``heads`` rows ``block_size``
    apart, so ``rows`` is that strided ``slice``: the write is one slice-update node per
    side (a scatter by an index array costs MLX a reshape node too) and the plan makes
    no host-to-MLX transfer at all.
    """

    def __init__(self, geom: PoolGeometry, slots: list[tuple[int, int]]) -> None:
        h, bs, sb = geom.kv_heads, geom.block_size, geom.slab_blocks
        self.num_tokens = n = len(slots)
        self.groups: list[tuple[int, int, int, mx.array | slice]] = []
        self.perm: mx.array | None = None
        if n == 1:
            block, row = slots[0]
            base = (block % sb) * (h * bs) + row
            self.groups.append((block // sb, 0, h, slice(base, base + (h - 1) * bs + 1, bs)))
            return
        if n == 0:
            return
        pairs = np.asarray(slots, dtype=np.int64).reshape(n, 2)
        slab = pairs[:, 0] // sb
        base = (pairs[:, 0] % sb) * (h * bs) + pairs[:, 1]
        order = np.argsort(slab, kind="stable")
        ordered = bool(np.all(order == np.arange(n)))
        heads = np.arange(h, dtype=np.int64)
        rows = (base[order][:, None] + heads[None, :] * bs).reshape(-1)
        perm = (order[:, None] * h + heads[None, :]).reshape(-1)
        packed = host_array(np.concatenate([rows] if ordered else [perm, rows])
                            .astype(np.int32))
        off = 0 if ordered else n * h
        if not ordered:
            self.perm = packed[: n * h]
        all_rows = packed[off : off + n * h]
        cuts = np.flatnonzero(np.diff(slab[order])) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), n], strict=True):
            group_rows = all_rows if (lo, hi) == (0, n) else all_rows[lo * h : hi * h]
            self.groups.append((int(slab[order[lo]]), lo * h, hi * h, group_rows))

    def write_into(self, side: list[mx.array], new: mx.array):
        """Write ``new``'s rows (``[T * heads, width]``, the token order of ``slots``)
        into the slabs of ``side``; yields each slab index written."""
        src = new if self.perm is None else new[self.perm]
        whole = len(self.groups) == 1
        for s, lo, hi, rows in self.groups:
            side[s][rows] = src if whole else src[lo:hi]
            yield s


def padded_table(table: list[list[int]], width: int | None = None) -> np.ndarray:
    """``[B, nblk]`` int64 block ids, ``nblk`` the longest row (or ``width``, at least
    that); shorter rows padded with their first block (the paths mask padding by
    lengths)."""
    longest = max((len(r) for r in table), default=0)
    out = np.empty((len(table), longest if width is None else width), dtype=np.int64)
    for i, r in enumerate(table):
        out[i, : len(r)] = r
        out[i, len(r) :] = r[0] if r else 0
    return out


class GatherPlan:
    """Block ids of a ``[B, nblk]`` table grouped by slab, to gather without copying
    the pool: one ``take`` per slab touched, then one permutation if several were.
    Rows shorter than ``nblk`` are padded with their first block (masked by lengths)."""

    def __init__(self, geom: PoolGeometry, table: list[list[int]]) -> None:
        sb = geom.slab_blocks
        padded = padded_table(table)
        self.shape = padded.shape
        flat = padded.reshape(-1)
        slab = flat // sb
        self.groups: list[tuple[int, mx.array]] = []
        self.inverse: mx.array | None = None
        if flat.size and slab.min() == slab.max():
            self.groups.append((int(slab[0]), host_array((flat % sb).astype(np.int32))))
            return
        order = np.argsort(slab, kind="stable")
        bounds = np.flatnonzero(np.diff(slab[order])) + 1
        for part in np.split(order, bounds):
            if part.size:
                local = (flat[part] % sb).astype(np.int32)
                self.groups.append((int(slab[part[0]]), host_array(local)))
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        self.inverse = host_array(inv.astype(np.int32))


class SlabPool:
    """K and V slabs for every layer.  ``grow(n)`` makes the pool ``n`` slabs long.
    ``max_slabs``: the most slabs it will ever hold (None = unknown), so kernels can be
    built once for the largest pool instead of once per size."""

    def __init__(self, geom: PoolGeometry, initial_slabs: int = 0,
                 max_slabs: int | None = None) -> None:
        self.geom = geom
        self.max_slabs = max_slabs
        self.k: list[list[mx.array]] = [[] for _ in range(geom.num_layers)]
        self.v: list[list[mx.array]] = [[] for _ in range(geom.num_layers)]
        # quantized pools only: [rows, 1] float16 scales per value slab (else stay empty)
        self.k_scale: list[list[mx.array]] = [[] for _ in range(geom.num_layers)]
        self.v_scale: list[list[mx.array]] = [[] for _ in range(geom.num_layers)]
        self._dirty: dict[tuple[int, int, int], mx.array] = {}
        # per layer, the token of an in-place write (kvcache/inplace.py) its readers take
        self.deps: dict[int, mx.array] = {}
        self._tokens: list[mx.array] = []  # in-place writes' tokens, pending like slabs
        self.grow(initial_slabs)

    @property
    def num_slabs(self) -> int:
        return len(self.k[0])

    @property
    def nbytes(self) -> int:
        return self.num_slabs * self.geom.slab_bytes

    def grow(self, num_slabs: int) -> None:
        g = self.geom
        rows = g.slab_blocks * g.kv_heads * g.block_size
        new: list[mx.array] = []
        for layer in range(g.num_layers):
            for side in (self.k[layer], self.v[layer]):
                while len(side) < num_slabs:
                    side.append(mx.zeros((rows, g.head_dim), dtype=g.dtype))
                    new.append(side[-1])
            for side in (self.k_scale[layer], self.v_scale[layer]) if g.quantized else ():
                while len(side) < num_slabs:
                    side.append(mx.zeros((rows, 1), dtype=SCALE_DTYPE))
                    new.append(side[-1])
        if new:
            mx.eval(new)

    # ---- whole-pool views (compiled step graphs: engine/step_graph.py) -------------------
    def arrays(self) -> list[mx.array]:
        """Every slab array: K, V, then a quantized pool's K and V scales, each layer by
        layer and slab by slab (``num_slabs`` per layer)."""
        return [a for side in (self.k, self.v, self.k_scale, self.v_scale)
                for layer in side for a in layer]

    def view(self, arrays: list[mx.array]) -> SlabPool:
        """A pool of this geometry over ``arrays`` (``arrays()``'s order): what a traced
        step writes to; ``written()`` then lists what its writes replaced."""
        pool = object.__new__(SlabPool)
        pool.geom, pool.max_slabs, pool._dirty, pool.deps = self.geom, self.max_slabs, {}, {}
        pool._tokens = []
        layers, n = self.geom.num_layers, self.num_slabs
        sides = [[arrays[(i * layers + layer) * n:(i * layers + layer + 1) * n]
                  for layer in range(layers)] for i in range(len(arrays) // (layers * n))]
        pool.k, pool.v = sides[0], sides[1]
        pool.k_scale, pool.v_scale = (sides[2], sides[3]) if len(sides) == 4 else (
            [[] for _ in range(layers)], [[] for _ in range(layers)])
        return pool

    def written(self) -> list[tuple[tuple[int, int, int], mx.array]]:
        """(``(layer, side, slab)``, array) of each slab written since ``take_pending``,
        in key order; side 0 / 1 values K / V, 2 / 3 their scales."""
        return sorted(self._dirty.items(), key=lambda item: item[0])

    def adopt(self, keys: list[tuple[int, int, int]], arrays: list[mx.array]) -> None:
        """Take ``arrays`` as the slabs at ``keys`` (``written()``'s), pending like any
        write."""
        sides = (self.k, self.v, self.k_scale, self.v_scale)
        for (layer, side, s), arr in zip(keys, arrays, strict=True):
            sides[side][layer][s] = arr
            self._dirty[(layer, side, s)] = arr

    def slab(self, layer: int, side: int, s: int) -> mx.array:
        """Slab ``s`` of ``layer`` (side 0 = K, 1 = V) as ``[slab_blocks, kv_heads, bs, D]``."""
        g = self.geom
        arr = (self.k if side == 0 else self.v)[layer][s]
        return arr.reshape(g.slab_blocks, g.kv_heads, g.block_size, g.head_dim)

    def scale_slab(self, layer: int, side: int, s: int) -> mx.array:
        """Scales of slab ``s`` (quantized pools) as ``[slab_blocks, kv_heads, bs, 1]``."""
        g = self.geom
        arr = (self.k_scale if side == 0 else self.v_scale)[layer][s]
        return arr.reshape(g.slab_blocks, g.kv_heads, g.block_size, 1)

    def slabs(self, layer: int, side: int) -> list[mx.array]:
        return [self.slab(layer, side, s) for s in range(self.num_slabs)]

    def write(self, layer: int, plan: WritePlan, k: mx.array, v: mx.array) -> None:
        """Write new tokens' K and V, each ``[T, kv_heads, head_dim]`` or already flat
        ``[T * kv_heads, head_dim]`` (then no reshape node), in place (one scatter or
        slice update per slab touched and side, plus one for the scales of a quantized
        pool, by the plan's flat rows).  Quantizing costs O(new tokens).  A plan that writes
        in place (kvcache/inplace.py) hands the values to its writer and leaves the
        writer's token in ``deps`` (for this layer's readers) and pending."""
        g = self.geom
        if k.ndim != 2:
            k, v = k.reshape(-1, g.head_dim), v.reshape(-1, g.head_dim)
        if g.quantized:
            (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
        else:  # astype to the pool's dtype is no node when it already is
            k, v, k_scale, v_scale = k.astype(g.dtype), v.astype(g.dtype), None, None
        if getattr(plan, "in_place", False):
            token = plan.writer.write(self, layer, plan.packed, k, v, k_scale, v_scale)
            self.deps[layer] = token
            self._tokens.append(token)
            return
        for i, (vals, scale) in enumerate(((k, k_scale), (v, v_scale))):
            if scale is not None:
                self._scatter((self.k_scale, self.v_scale)[i][layer], (layer, i + 2), plan,
                              scale)
            self._scatter((self.k, self.v)[i][layer], (layer, i), plan, vals)

    def _scatter(self, side: list[mx.array], key: tuple[int, int], plan: WritePlan,
                 new: mx.array) -> None:
        for s in plan.write_into(side, new):
            self._dirty[(*key, s)] = side[s]

    def take_pending(self) -> list[mx.array]:
        """Slabs written since the last call, and in-place writes' tokens: evaluate them
        with the step's outputs so writes nobody reads yet still land (and the graph does
        not grow).  Also forgets ``deps``: the next forward's readers wait for its own
        writes only."""
        out = [*self._dirty.values(), *self._tokens]
        self._dirty.clear()
        self._tokens.clear()
        self.deps.clear()
        return out

    def gather(self, layer: int, side: int, plan: GatherPlan,
               dtype: mx.Dtype | None = None) -> mx.array:
        """Blocks of a table as ``[B, nblk, kv_heads, block_size, head_dim]``, in the
        pool's dtype; a quantized pool's pages dequantized to ``dtype`` when given (else
        its raw int8 values)."""
        g = self.geom
        dep = self.deps.get(layer)  # read after this forward's in-place write of the layer
        zero = None if dep is None else dep[:1] * 0
        out = self._take(plan, lambda s: self.slab(layer, side, s), zero)
        if g.quantized and dtype is not None:
            scale = self._take(plan, lambda s: self.scale_slab(layer, side, s), zero)
            out = dequantize(out, scale, dtype)
        return out.reshape(*plan.shape, g.kv_heads, g.block_size, out.shape[-1])

    @staticmethod
    def _take(plan: GatherPlan, slab, zero: mx.array | None = None) -> mx.array:
        """``plan``'s blocks of ``slab(s)``; ``zero`` (an int32 ``[1]`` of 0 computed from
        a write's token) joins the ids, so the reads wait for that write."""
        parts = [slab(s)[ids if zero is None else ids + zero] for s, ids in plan.groups]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)[plan.inverse]

"""K/V writes into the pool's own buffers on CUDA: decode step graphs and prefill chunks.

A functional write (``put_along_axis``) lands in place only where MLX may donate the slab
to the write's output: nothing else may hold the slab's buffer.  With async scheduling
the next decode step is evaluated while the previous one runs, and the previous step's
in-flight work still holds the slab it wrote, so the write copies the whole slab (on an
H100, one-row writes into a 2 GiB slab: 1.4-1.5 ms a step, 2-6 GiB of transient memory,
against 0.06-0.08 ms written in place: docs/adr/0014-inplace-kv-writes.md).

``InPlaceWriter`` is a CUDA kernel that writes a step's new K/V rows (and a quantized
pool's scales) into the slabs it takes as inputs and returns a small token.  The slabs
keep their identity (nothing is adopted, nothing donated, no transient), so the kernel's
writes are invisible to MLX's graph: whatever reads them must take the token (an output
the kernel never writes) as an input (the native CUDA kernel does: ``SlabPool.deps``),
which orders the read after the write on the device (``mx.depends`` does not: on an H100
a read through it raced the write).  A prefill chunk's attention gathers its own rows
back from the pool: ``SlabPool.gather`` adds ``token * 0`` to its block ids for the same
edge.  Writes of two steps touch disjoint rows, so an in-flight step's reads never see the
next step's writes.  A token nothing reads still waits in ``SlabPool.take_pending``, so
the write runs.

Invariants: each of a plan's rows lands in its slab row and nowhere else changes; a row
of ``-1`` (a padded batch's extra rows) writes nothing; the plan's key is its row count.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.pool import PoolGeometry, SlabPool

BODY = """
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int r = i / W;
  if (r >= rows_shape[0]) return;
  const int g = rows[r];
  if (g < 0) return;
  const int sr = k0_shape[0];
  const int s = g / sr;
  const size_t row = (size_t)(g - s * sr);
  const int c = i - r * W;
  T* kd = const_cast<T*>({kpick});
  T* vd = const_cast<T*>({vpick});
  kd[row * W + c] = knew[i];
  vd[row * W + c] = vnew[i];
{scales}"""

# The token is never written: it exists for the graph edge.  Four int32 (16 bytes): MLX's
# CUDA allocator serves buffers of at most 8 bytes from a managed pool whose reads are slow
# (docs/adr/0010-no-scalar-pool-inputs.md).
TOKEN_SIZE = 4

SCALES = """  if (c == 0) {{
    __half* ksd = const_cast<__half*>({kspick});
    __half* vsd = const_cast<__half*>({vspick});
    ksd[row] = ksnew[r];
    vsd[row] = vsnew[r];
  }}
"""


def _pick(prefix: str, n: int) -> str:
    """``s == 0 ? k0 : s == 1 ? k1 : ... k{n-1}``."""
    expr = f"{prefix}{n - 1}"
    for s in range(n - 2, -1, -1):
        expr = f"s == {s} ? {prefix}{s} : {expr}"
    return expr


class InPlaceWriter:
    """The in-place write kernel (module docstring), one compiled kernel per slab count
    and quantization.  ``probe(geom)`` checks it here once; ``write`` returns the token."""

    def __init__(self) -> None:
        self._kernels: dict[tuple[int, bool], object] = {}

    def _kernel(self, n: int, quantized: bool):
        key = (n, quantized)
        if key not in self._kernels:
            scales = SCALES.format(kspick=_pick("ks", n), vspick=_pick("vs", n))
            body = BODY.format(kpick=_pick("k", n), vpick=_pick("v", n),
                               scales=scales if quantized else "")
            names = ["rows", "knew", "vnew", *(f"k{i}" for i in range(n)),
                     *(f"v{i}" for i in range(n))]
            if quantized:
                names += ["ksnew", "vsnew", *(f"ks{i}" for i in range(n)),
                          *(f"vs{i}" for i in range(n))]
            tag = hashlib.sha1(body.encode()).hexdigest()[:10]
            self._kernels[key] = mx.fast.cuda_kernel(
                name=f"slabserve_inplace_write_{tag}", input_names=names,
                output_names=["token"], source=body)
        return self._kernels[key]

    def write(self, pool: SlabPool, layer: int, rows: mx.array, k: mx.array,
              v: mx.array, k_scale: mx.array | None = None,
              v_scale: mx.array | None = None) -> mx.array:
        """Write ``k`` / ``v`` ``[R, head_dim]`` (the pool's dtype; a quantized pool's
        int8 values with their ``[R, 1]`` float16 scales) at ``rows`` ``[R]`` (global flat
        rows: slab * slab rows + row, or -1) of ``layer``'s slabs; the token to read after."""
        g = pool.geom
        inputs = [rows, k, v, *pool.k[layer], *pool.v[layer]]
        quantized = k_scale is not None
        if quantized:
            inputs += [k_scale, v_scale, *pool.k_scale[layer], *pool.v_scale[layer]]
        n = rows.shape[0] * g.head_dim
        threads = 256
        return self._kernel(pool.num_slabs, quantized)(
            inputs=inputs, template=[("T", g.dtype), ("W", g.head_dim)],
            grid=(-(-n // threads) * threads, 1, 1), threadgroup=(threads, 1, 1),
            output_shapes=[(TOKEN_SIZE,)], output_dtypes=[mx.int32])[0]

    def probe(self, geom: PoolGeometry, slab_counts: tuple[int, ...] = (1, 2)) -> str | None:
        """None when the kernel writes small pools of ``geom``'s dtype and head shape, one
        per slab count of ``slab_counts`` (the kernel differs by count), rows of every slab
        and skipped rows included, exactly as a reference does; else why not."""
        try:
            for n in slab_counts:
                if not self._probe_one(geom, n):
                    return f"probe wrote the wrong rows ({n} slab(s))"
        except Exception as e:  # compile or launch failure: the caller keeps scatters
            return f"kernel failed: {type(e).__name__}: {str(e)[:300]}"
        return None

    def _probe_one(self, geom: PoolGeometry, n: int) -> bool:
        small = PoolGeometry(1, geom.kv_heads, geom.head_dim, geom.block_size, 4, geom.dtype)
        pool = SlabPool(small, initial_slabs=n)
        rng = np.random.default_rng(n)
        per_slab = 4 * geom.kv_heads * geom.block_size
        rows = rng.choice(n * per_slab, size=min(6 * n, n * per_slab), replace=False)
        rows = rows.astype(np.int32)
        rows[rng.integers(len(rows))] = -1
        before = [_host(a) for a in pool.arrays()]
        k, v, ks, vs = _random_rows(small, len(rows), rng)
        mx.eval(self.write(pool, 0, host_array(rows), k, v, ks, vs))
        after = [_host(a) for a in pool.arrays()]
        want = reference_write(before, rows, [k, v, ks, vs], per_slab)
        return all(np.array_equal(a, b) for a, b in zip(after, want, strict=True))


def _random_rows(g: PoolGeometry, n: int, rng) -> tuple:
    """(k, v, k scales or None, v scales or None) for ``n`` new rows of ``g``."""
    if g.quantized:
        vals = [mx.array(rng.integers(-127, 128, (n, g.head_dim)).astype(np.int8))
                for _ in range(2)]
        scales = [mx.array(rng.random((n, 1)).astype(np.float16)) for _ in range(2)]
        return vals[0], vals[1], scales[0], scales[1]
    k, v = (mx.array(rng.standard_normal((n, g.head_dim)).astype(np.float32)).astype(g.dtype)
            for _ in range(2))
    return k, v, None, None


def _host(a: mx.array) -> np.ndarray:
    """``a`` in numpy, bfloat16 as float32 (exactly)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def reference_write(before: list[np.ndarray], rows: np.ndarray, new: list,
                    per_slab: int) -> list[np.ndarray]:
    """What the kernel must leave: ``before`` (one layer's slabs in ``SlabPool.arrays()``'
    order: K, V, then a quantized pool's K and V scales, each side's slabs in order) with
    ``new``'s rows (k, v, k scales, v scales; None for a side not written) at ``rows``
    (global flat rows, -1: nowhere)."""
    out = [a.copy() for a in before]
    n = len(before) // (4 if new[2] is not None else 2)
    for side, arr in enumerate(new):
        if arr is None:
            continue
        arr = _host(arr)
        for r, g in enumerate(rows):
            if g >= 0:
                s, row = divmod(int(g), per_slab)
                out[side * n + s][row] = arr[r]
    return out


class InPlaceWritePlan:
    """Where a step's ``T`` new tokens go (a decode step's or a prefill chunk's;
    ``slots``: (global block id, row in block) per token) as ``T * heads`` global flat
    rows (slab * slab rows + row in slab), the last ``pad`` slots' rows -1 (a padded
    batch's extra rows write nothing).  ``SlabPool.write`` hands a layer's values
    (quantized for an int8 pool) and ``packed`` to ``writer``; ``key`` fixes the graph."""

    in_place = True

    def __init__(self, geom: PoolGeometry, slots: list[tuple[int, int]], writer: InPlaceWriter,
                 pad: int = 0) -> None:
        # a block's rows follow the blocks before it, slab after slab: its first global
        # row is block * (heads * block_size), whichever slab holds it
        h, bs = geom.kv_heads, geom.block_size
        real = np.asarray(slots[: len(slots) - pad], dtype=np.int32).reshape(-1, 2)
        base = real[:, 0] * (h * bs) + real[:, 1]
        rows = (base[:, None] + np.arange(0, h * bs, bs, dtype=np.int32)).reshape(-1)
        if pad:
            rows = np.concatenate([rows, np.full(pad * h, -1, dtype=np.int32)])
        self.writer = writer
        self.packed = host_array(rows)

    @property
    def key(self) -> tuple:
        return ("inplace", self.packed.shape[0])

    def rebind(self, packed: mx.array) -> InPlaceWritePlan:
        """The same plan over ``packed`` (an array of this plan's ``packed`` shape)."""
        plan = object.__new__(InPlaceWritePlan)
        plan.writer, plan.packed = self.writer, packed
        return plan

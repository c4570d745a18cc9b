"""Where a launch of the native split kernel spends its time, block by block (CUDA only).

``python -m experiments.block_stamps --cells 8:1024:8,8:4096:8,8:16384:8 [--layers 16]``
(from the repository root; on the GPU machine with ``PYTHONPATH=$PWD:/tmp/site``).

Cells are ``B:ctx:chunks`` (chunks 0: the plan's).  The FMA kernel (``pooled_decode_async``:
variants async and lean) is built with timing marks that ``instrument`` writes into a copy
of the shipped source at fixed places (``MARKS_AT``; the served kernel has none): thread 0
of every block reads the GPU's global timer (ns) at the block's
start, at each step of its prologue (``summarize_launch``), when its first stage of K/V
arrived, after its token loop and at its end (after the block's merge), and its
multiprocessor id.  The layers run chained as in ``bench.cuda_kernel --table``; launches
2.. of each eval are summarised (medians over launches) by ``summarize_launch``:

* ``span``: first block start to last block end (the kernel's time, less its launch);
* ``start_max``: when the last block started, after the first;
* ``issued``: start -> the pipeline's first stages issued (lengths, q and table loads);
* ``first_data``: start -> first K/V stage in (table and page loads in a row), p50 / p90;
* ``loop``, ``tail``: the token loop, and merge + writes after it, p50 / max; the loop's
  p50 also for blocks on the most crowded SMs and on the others;
* ``block``: a block's whole time, p50 / max; ``end_p10``: when a tenth of the blocks had
  finished;
* ``sm_blocks``: blocks per multiprocessor, min-max.

A diagnostic, not a test; the arithmetic (``summarize_launch``) has a CPU test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import mlx.core as mx
import numpy as np

from slabserve.attention.native_cuda import NativeCUDA
from slabserve.bench.cuda_kernel import cuda_args, int_cells, make_case

MARKS = 8  # SLABSERVE_MARK slots (0: block start; the others: MARKS_AT)
FIELDS = MARKS + 2  # per block: the marks, then its end and its SM id

PRELUDE = f"#define SLABSERVE_STAMP_MARKS {MARKS}\n" + r"""namespace slabserve {
__shared__ unsigned long long stamp_marks[SLABSERVE_STAMP_MARKS];
__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
}  // namespace slabserve
#define SLABSERVE_MARK(k) \
  do { if (threadIdx.x == 0) ::slabserve::stamp_marks[k] = ::slabserve::gtimer(); } while (0)
#define SLABSERVE_MARK_AFTER(k, x) \
  do { asm volatile("" ::"f"(x)); SLABSERVE_MARK(k); } while (0)
"""

# (text of pooled_decode_async in attention/kernels/pooled_decode.cu, the same with its
# marks): 4 entry, 5 lengths read, 6 q read, 1 first stages issued, 2 first stage in,
# 3 loop done.  Each text must occur exactly once (tests/test_block_stamps.py checks it).
MARKS_AT = [
    ("  S st;\n  if (!st.template begin<BS, DIRECT>(lengths, mp, opart, lse, counters, "
     "out)) return;\n  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];\n"
     "  st.load_q(q, qscale, qv, m, l, acc);\n",
     "  S st;\n  SLABSERVE_MARK(4);\n  if (!st.template begin<BS, DIRECT>(lengths, mp, "
     "opart, lse, counters, out)) return;\n  SLABSERVE_MARK(5);\n"
     "  float qv[GB][VEC], m[GB], l[GB], acc[GB][VEC];\n"
     "  st.load_q(q, qscale, qv, m, l, acc);\n  SLABSERVE_MARK_AFTER(6, qv[GB - 1][VEC - 1]);\n"),
    ("  int blk_next = blk_of(ST - 1);\n  for (int it = 0; it < n_it; ++it) {  // n_it is "
     "warp-uniform: shuffles stay converged\n",
     "  int blk_next = blk_of(ST - 1);\n  SLABSERVE_MARK(1);\n  for (int it = 0; it < n_it; "
     "++it) {  // n_it is warp-uniform: shuffles stay converged\n"),
    ("    cp_wait<ST - 1>();\n    const uint4* src = smem + (it % ST) * 2 * U * NT + tid;\n",
     "    cp_wait<ST - 1>();\n    if (it == 0) SLABSERVE_MARK(2);\n"
     "    const uint4* src = smem + (it % ST) * 2 * U * NT + tid;\n"),
    ("  cp_wait<0>();\n  __syncthreads();  // the stage buffers are reused by the merge\n",
     "  SLABSERVE_MARK(3);\n  cp_wait<0>();\n"
     "  __syncthreads();  // the stage buffers are reused by the merge\n"),
]
FINISH_INLINE = "__device__ __forceinline__ void finish_split("


def instrument(header: str, finish_noinline: bool = False) -> str:
    """The kernel header with PRELUDE before it and the marks of MARKS_AT in it;
    ``finish_noinline``: the fused kernel's last-block merge (``finish_split``) as a call.
    ValueError when the shipped source no longer has a text where a mark goes."""
    patches = [*MARKS_AT]
    if finish_noinline:
        patches.append((FINISH_INLINE, FINISH_INLINE.replace("__forceinline__", "__noinline__")))
    for old, new in patches:
        if header.count(old) != 1:
            raise ValueError(f"kernel source changed: {old.strip()[:60]!r} not found once")
        header = header.replace(old, new)
    return PRELUDE + header

HEAD = r"""  if (threadIdx.x == 0) {
    for (int k = 1; k < SLABSERVE_STAMP_MARKS; ++k) ::slabserve::stamp_marks[k] = 0;
    ::slabserve::stamp_marks[0] = ::slabserve::gtimer();
  }
"""

TAIL = r"""  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long t_end = ::slabserve::gtimer();
    unsigned int smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    const size_t bid = ((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    auto* mine = stamps + bid * (SLABSERVE_STAMP_MARKS + 2);
    for (int k = 0; k < SLABSERVE_STAMP_MARKS; ++k) mine[k] = ::slabserve::stamp_marks[k];
    mine[SLABSERVE_STAMP_MARKS] = t_end;
    mine[SLABSERVE_STAMP_MARKS + 1] = smid;
  }
"""


class StampedCUDA(NativeCUDA):
    """NativeCUDA whose main kernels also write ``FIELDS`` int64 stamps per block: each
    compiled main kernel is wrapped to append its stamps output to ``self.stamps`` (in
    launch order, while the graph is built) and to return the outputs NativeCUDA expects."""

    def __init__(self, gpu_meta: bool = False, spare_input: bool = False,
                 finish_noinline: bool = False, stages: int | None = None, **kw) -> None:
        super().__init__(**kw)
        if stages is not None:
            self.stages = stages  # cp.async ring depth (the shipped one: STAGES)
        self.stamps: list[mx.array] = []
        self.gpu_meta = gpu_meta  # table and lengths as copies written by a GPU kernel
        # the split kernel takes one more (unused) int32 input, as the fused one takes its
        # counters; the fused kernel's last-block merge is not inlined
        self.spare_input, self.finish_noinline = spare_input, finish_noinline
        self._spare = mx.zeros((256,), dtype=mx.int32)
        self._meta: dict[int, tuple[mx.array, mx.array]] = {}

    def _copied(self, a: mx.array) -> mx.array:
        hit = self._meta.get(id(a))
        if hit is None or hit[0] is not a:
            c = a + 0
            mx.eval(c)
            hit = self._meta[id(a)] = (a, c)
        return hit[1]

    def _header(self, variant: str) -> str:
        return instrument(super()._header(variant), self.finish_noinline)

    def _body(self, kind: str, ns: int, variant: str, scale: float = 1.0, sb: int = 0) -> str:
        body = super()._body(kind, ns, variant, scale, sb)
        return body if kind == "merge" else HEAD + body + TAIL

    def _compile(self, name, names, outs, body, smem, header):
        if "_merge_" in name:
            return super()._compile(name, names, outs, body, smem, header)
        spare = self.spare_input and "_split_" in name
        names = [*names, "spare"] if spare else names
        kernel = super()._compile(name + "_stamped", names, [*outs, "stamps"], body, smem,
                                  header)
        meta = [names.index("table"), names.index("lengths")] if self.gpu_meta else []

        def run(*, inputs, **kw):
            inputs = [*inputs, self._spare] if spare else list(inputs)
            for i in meta:
                inputs[i] = self._copied(inputs[i])
            got = kernel(inputs=inputs, **kw)
            self.stamps.append(got[-1])
            return got[:-1]

        return run

    def _launch(self, q, g, ns, chunks, fused, scale, pages):
        main, merge = super()._launch(q, g, ns, chunks, fused, scale, pages)
        kern, kw = main
        gx, gy, gz = kw["grid"]
        blocks = gx // kw["threadgroup"][0] * gy * gz
        kw = dict(kw, output_shapes=[*kw["output_shapes"], (blocks * FIELDS,)],
                  output_dtypes=[*kw["output_dtypes"], mx.int64])
        return (kern, kw), merge


def _pct(xs: np.ndarray, p: float) -> float:
    return float(np.percentile(xs, p)) if xs.size else float("nan")


def _launch_blocks(stamps: np.ndarray) -> tuple:
    """One launch's stamps as ``[blocks, FIELDS]`` floats, the mask of full blocks (marks
    1-3 set: not an empty chunk), each block's index into the per-SM counts, the blocks
    per SM, and each block's token loop (us)."""
    st = stamps.reshape(-1, FIELDS).astype(np.float64)
    full = (st[:, 1] > 0) & (st[:, 2] > 0) & (st[:, 3] > 0)
    _, sm_of, per_sm = np.unique(st[:, MARKS + 1], return_inverse=True, return_counts=True)
    return st, full, sm_of, per_sm, (st[:, 3] - st[:, 2]) / 1e3


def summarize_launch(stamps: np.ndarray) -> dict:
    """Microsecond figures of one launch from its ``[blocks, FIELDS]`` stamps (ns).  Blocks
    that returned before their token loop (empty chunks) have zero marks 1-3 and count
    only in span, start and end figures.  Prologue figures are from the block's start:
    ``entry`` (the slab table in shared memory), ``lengths`` (its length read),
    ``q`` (its q rows read), ``issued`` (the first stages' table reads and copies issued)."""
    st, full, sm_of, per_sm, loop = _launch_blocks(stamps)
    loop = loop[full]
    t0 = st[:, 0].min()
    start, end = st[:, 0] - t0, st[:, MARKS] - t0

    def since_start(k: int) -> np.ndarray:
        return (st[full, k] - st[full, 0]) / 1e3

    tail = (st[full, MARKS] - st[full, 3]) / 1e3
    block = (end - start) / 1e3
    crowded = (per_sm[sm_of] == per_sm.max())[full]  # blocks on the most loaded SMs
    out = dict(blocks=int(st.shape[0]), span=end.max() / 1e3, start_max=start.max() / 1e3)
    for name, k in (("entry", 4), ("lengths", 5), ("q", 6)):
        out[f"{name}_p50"] = _pct(since_start(k), 50)
    out.update(
        issued_p50=_pct(since_start(1), 50), issued_p90=_pct(since_start(1), 90),
        first_data_p50=_pct(since_start(2), 50), first_data_p90=_pct(since_start(2), 90),
        loop_p50=_pct(loop, 50), loop_max=_pct(loop, 100),
        loop_p50_crowded=_pct(loop[crowded], 50), loop_p50_other=_pct(loop[~crowded], 50),
        tail_p50=_pct(tail, 50), tail_max=_pct(tail, 100),
        block_p50=_pct(block, 50), block_max=block.max(), end_p10=_pct(end, 10) / 1e3,
        sm_blocks=f"{per_sm.min()}-{per_sm.max()}", sms=int(per_sm.size))
    return out


def median_summary(launches: list[dict]) -> dict:
    """Median of each numeric figure over launches (strings from the first)."""
    out = {}
    for k, v in launches[0].items():
        if isinstance(v, str):
            out[k] = v
        else:
            out[k] = round(statistics.median(x[k] for x in launches), 2)
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def persistence(raw: list[np.ndarray]) -> dict:
    """Whether the slow blocks of a launch are slow again in the next ones, from the raw
    stamps of launches with the same grid.  Per launch, each full block's token loop (us)
    less the median loop of the blocks on SMs that hold as many blocks as its own (the
    crowding removed); then the launches are split into even and odd halves and the mean
    residual per SM id (``r_sm``) and per block id (``r_block``) of one half is correlated
    with the other's.  High ``r_sm``: some SMs stream slower every time (a schedule by SM
    could compensate); high ``r_block`` with low ``r_sm``: some blocks' pages are slow;
    both low: the spread is noise of each launch.  ``same_sm``: the fraction of block ids
    that ran on the same SM in every launch.  ``sm_resid_p90`` / ``_max``: the per-SM mean
    residual's spread (us)."""
    rows = []
    for stamps in raw:
        st, full, sm_of, per_sm, loop = _launch_blocks(stamps)
        sm = st[:, MARKS + 1].astype(np.int64)
        crowd = per_sm[sm_of]
        resid = np.full(st.shape[0], np.nan)
        for c in np.unique(crowd[full]):
            sel = full & (crowd == c)
            resid[sel] = loop[sel] - np.median(loop[sel])
        rows.append((sm, resid))
    n_sm = 1 + max(int(sm.max()) for sm, _ in rows)

    def half_means(part: list) -> tuple[np.ndarray, np.ndarray]:
        by_sm = np.zeros((len(part), n_sm))
        cnt = np.zeros((len(part), n_sm))
        for i, (sm, resid) in enumerate(part):
            ok = ~np.isnan(resid)
            np.add.at(by_sm[i], sm[ok], resid[ok])
            np.add.at(cnt[i], sm[ok], 1)
        with np.errstate(invalid="ignore"):
            per_sm = by_sm.sum(0) / cnt.sum(0)
            per_block = np.nanmean(np.stack([r for _, r in part]), axis=0)
        return per_sm, per_block

    sm_a, blk_a = half_means(rows[0::2])
    sm_b, blk_b = half_means(rows[1::2])
    ok_sm = ~np.isnan(sm_a) & ~np.isnan(sm_b)
    ok_blk = ~np.isnan(blk_a) & ~np.isnan(blk_b)
    sms = np.stack([sm for sm, _ in rows])
    both = (sm_a[ok_sm] + sm_b[ok_sm]) / 2
    return dict(r_sm=round(_corr(sm_a[ok_sm], sm_b[ok_sm]), 3),
                r_block=round(_corr(blk_a[ok_blk], blk_b[ok_blk]), 3),
                same_sm=round(float((sms == sms[0]).all(0).mean()), 3),
                sm_resid_p90=round(_pct(both, 90), 2),
                sm_resid_max=round(float(both.max()) if both.size else float("nan"), 2))


def cell_stamps(b: int, ctx: int, chunks: int, layers: int, evals: int, fused: bool,
                same_layer: bool = False, contiguous: bool = False, stages: int | None = None,
                gpu_meta: bool = False, spare_input: bool = False,
                finish_noinline: bool = False, sm_report: bool = False,
                gap_op: bool = False, variant: str = "auto") -> dict:
    """``same_layer``: every layer reads layer 0's K/V; ``contiguous``: tables of
    consecutive blocks (default shuffled over the slab, as the table); ``gap_op``: a tiny
    kernel (a negation of the layer's output) between layers, as the merge launch is
    between split launches; ``stages``: the cp.async ring depth (None: the shipped one)."""
    pool, batch, q = make_case([ctx] * b, 32, 8, 64, 16, mx.float16, 4096,
                               layers=1 if same_layer else layers, contiguous=contiguous)
    scale = 1.0 / math.sqrt(64)
    nat = StampedCUDA(fused_merge=fused, stages=stages, gpu_meta=gpu_meta,
                      spare_input=spare_input, finish_noinline=finish_noinline,
                      variant=variant)
    assert nat.decline(q, pool, batch) is None
    launches, raw = [], []
    for rep in range(2 + evals):
        nat.stamps = []
        x = q
        for i in range(layers):
            lay = 0 if same_layer else i
            x = nat(x, pool, lay, batch, scale) if chunks <= 0 else nat._run(
                x, pool, lay, batch, scale, chunks)
            x = -x if gap_op else x
        mx.eval(x, *nat.stamps)
        if rep >= 2:
            raw += [np.array(s) for s in nat.stamps[2:]]
    launches = [summarize_launch(s) for s in raw]
    extra = persistence(raw) if sm_report else {}
    return dict(B=b, ctx=ctx, chunks=chunks, fused=fused, variant=variant, same=same_layer,
                contig=contiguous, st=stages, gmeta=gpu_meta, spare=spare_input,
                noinline=finish_noinline, gap=gap_op, **median_summary(launches), **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.block_stamps")
    ap.add_argument("--cells", default="8:1024:8,8:4096:8,8:16384:8,8:4096:16,1:32768:0")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--fused", action="store_true", help="merge inside the main launch")
    ap.add_argument("--same-layer", action="store_true",
                    help="every layer reads layer 0's K/V (warm translations)")
    ap.add_argument("--contiguous", action="store_true", help="tables of consecutive blocks")
    ap.add_argument("--stages", type=int, default=None,
                    help="cp.async ring depth (default: the shipped one)")
    ap.add_argument("--gpu-meta", action="store_true",
                    help="table and lengths as copies written by a GPU kernel")
    ap.add_argument("--spare-input", action="store_true",
                    help="the split kernel takes one more, unused, int32 input")
    ap.add_argument("--sm-report", action="store_true",
                    help="whether slow blocks are slow again: by SM and by block (persistence)")
    ap.add_argument("--gap-op", action="store_true",
                    help="a tiny kernel between layers (as the merge is between splits)")
    ap.add_argument("--finish-noinline", action="store_true",
                    help="the fused kernel's last-block merge as a call, not inlined")
    ap.add_argument("--variant", default="auto",
                    help="NativeCUDA's variant (auto, lean, async; mma has no marks)")
    a = cuda_args(ap, argv)
    if a is None:
        return 1
    rows = []
    for b, ctx, c in int_cells(a.cells):
        rows.append(cell_stamps(
            b, ctx, c, a.layers, a.evals, a.fused, same_layer=a.same_layer,
            contiguous=a.contiguous, stages=a.stages, gpu_meta=a.gpu_meta,
            spare_input=a.spare_input, finish_noinline=a.finish_noinline,
            sm_report=a.sm_report, gap_op=a.gap_op, variant=a.variant))
        print(json.dumps(rows[-1]), flush=True)
        mx.clear_cache()
    keys = [k for k in rows[0]
            if k not in ("B", "ctx", "chunks", "fused", "blocks", "sms", "variant")]
    print("\nus, medians over launches (block figures: percentiles over blocks)")
    print("| B | ctx | chunks | " + " | ".join(keys) + " |")
    print("|" + "--:|" * (3 + len(keys)))
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['chunks']} | "
              + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Metal int8 decode kernel (issue 24; kernels/pooled_decode.metal with the scale slabs,
attention/native_metal.py).  UNVERIFIED on Apple silicon: no Metal device here.  What is
tested without one: the body it renders, the inputs, template constants and grid it would
launch (an emulator of the kernel's contract, reading exactly those inputs, against the
float64 reference on the dequantized pool), and the guard: no Metal device, a failing
compile or a wrong result decline to the portable path."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from slabserve.attention.cuda_source import pool_slab_inputs
from slabserve.attention.native_metal import (
    METAL_FILE,
    METAL_INT8_VARIANT,
    NativeMetal,
    _sections,
    metal_body,
)
from slabserve.attention.reference import random_case, reference_decode

HAS_METAL = mx.metal.is_available()
BODY = _sections(METAL_FILE.read_text())["BODY"]
LOG2E = 1.4426950408889634


# ---- the rendered source ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["direct", "split"])
def test_int8_body_reads_the_scale_slabs(kind):
    body = metal_body(BODY, kind, 3, quantized=True)
    for marker in ("/*SELECT*/", "/*STORE*/", "/*EMPTY*/", "/*SCALESLABS*/", "/*KSCALE*/",
                   "/*VSCALE*/"):
        assert marker not in body
    assert "auto ksb = ks0;" in body and "auto vsb = vs0;" in body
    assert "else if (s == 2) { kb = k2; vb = v2; ksb = ks2; vsb = vs2; }" in body
    assert "ks3" not in body
    assert "const float ksc = float(ksb[row + j]);" in body
    assert "const float vsc = float(vsb[row + j]);" in body
    assert "sc[g][j] = d * ksc;" in body and "const float w = sc[g][j] * vsc;" in body
    assert "sizeof(T) == 1 ? 8" in body  # 8 int8 values a lane: the float16 row groups


def test_float_body_has_no_scales():
    body = metal_body(BODY, "direct", 3)
    assert "ksb" not in body and "vsb" not in body and "/*" + "KSCALE" not in body
    assert "const float ksc = 1.0f;" in body and "const float vsc = 1.0f;" in body
    assert "if (s == 1) { kb = k1; vb = v1; }" in body


# ---- an emulator of the kernel's contract ---------------------------------------------------
class KernelContract:
    """Stands in for ``mx.fast.metal_kernel``: computes what the Metal source computes, in
    float64, from exactly the named inputs, template constants and grid it is launched with
    (slab ``blk // sb``, row ``((blk % sb) * HKV + kv head) * BS + pos``, chunks of
    ``ceil(nblk / nchunk)`` pages, scales by row).  ``use_scales=False`` emulates a kernel
    that forgets them."""

    def __init__(self, log: list, use_scales: bool = True):
        self.log, self.use_scales = log, use_scales

    def __call__(self, **spec):
        def run(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
            names = spec["input_names"]
            assert len(inputs) == len(names)
            arr = {n: np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
                   for n, x in zip(names, inputs, strict=True)}
            t = dict(template)
            self.log.append(dict(spec=spec, names=names, template=t, grid=grid,
                                 tg=threadgroup, inputs=inputs))
            if names[0] == "opart":
                outs = [self._merge(arr, output_shapes[0])]
            else:
                outs = self._main(arr, t, grid, output_shapes, spec["output_names"])
            return [mx.array(o).astype(d) for o, d in zip(outs, output_dtypes, strict=True)]
        return run

    def _side(self, arr, side, s, row, quant):
        x = arr[f"{side}{s}"][row].astype(np.float64)
        if quant and self.use_scales:
            x = x * arr[f"{side}s{s}"][row, 0].astype(np.float64)
        return x

    def _main(self, arr, t, grid, shapes, out_names):
        hkv, bs, g, nt = t["HKV"], t["BS"], t["G"], t["NT"]
        assert grid[0] == hkv * (g // t["GB"]) * nt
        table, lengths, q = arr["table"], arr["lengths"], arr["q"].astype(np.float64)
        nchunk, (b_n, hq, _, d) = grid[1], q.shape
        sb, quant = arr["k0"].shape[0] // (hkv * bs), "ks0" in arr
        ppc = -(-table.shape[1] // nchunk)
        qs = q[:, :, 0] * float(arr["qscale"][0]) * LOG2E
        opart = np.zeros((b_n * hq, nchunk, d))
        lse = np.full((b_n * hq, nchunk), -np.inf)
        for b in range(b_n):
            for c in range(nchunk):
                toks = range(c * ppc * bs, min((c + 1) * ppc * bs, int(lengths[b])))
                for h in range(hq):
                    if not toks:
                        continue
                    kv = [(int(table[b, u // bs]), u % bs) for u in toks]
                    rows = [(blk // sb, ((blk % sb) * hkv + h // g) * bs + p) for blk, p in kv]
                    k = np.stack([self._side(arr, "k", s, r, quant) for s, r in rows])
                    v = np.stack([self._side(arr, "v", s, r, quant) for s, r in rows])
                    sc = k @ qs[b, h]
                    p = np.exp2(sc - sc.max())
                    opart[b * hq + h, c] = p @ v / p.sum()
                    lse[b * hq + h, c] = sc.max() + np.log2(p.sum())
        if out_names == ["out"]:
            assert nchunk == 1
            return [opart[:, 0].reshape(shapes[0])]
        return [opart.reshape(shapes[0]), lse]

    @staticmethod
    def _merge(arr, shape):
        lse, opart = arr["lse"], arr["opart"]
        nchunk, d = lse.shape[1], opart.shape[-1]
        w = np.exp2(lse - lse.max(axis=1, keepdims=True))
        parts = opart.reshape(-1, nchunk, d)
        return ((w[..., None] * parts).sum(1) / w.sum(1, keepdims=True)).reshape(shape)


def _int8_case(lens=(5, 40, 100), hq=12, hkv=4, d=64, bs=16, seed=3):
    return random_case(list(lens), hq, hkv, d, bs, mx.int8, slab_blocks=4, seed=seed)


@pytest.mark.parametrize("chunks", [1, 3])
def test_launch_passes_what_the_kernel_needs(monkeypatch, chunks):
    """The inputs, constants and grid NativeMetal launches are enough for the kernel's
    contract to give the float64 reference on the dequantized pool."""
    log: list = []
    monkeypatch.setattr(mx.fast, "metal_kernel", KernelContract(log))
    q, pool, batch = _int8_case()
    assert pool.num_slabs >= 3  # the if-chain and the scale slabs beyond slab 0
    got = NativeMetal()._run(q, pool, 0, batch, 0.125, chunks)
    want = reference_decode(q, pool, 0, batch, 0.125)
    g = np.array(got.astype(mx.float32), np.float64).reshape(want.shape)
    assert np.abs(g - want).max() / np.abs(want).max() < 4e-3  # float16 output
    main = log[0]
    ns = pool_slab_inputs(pool)
    slabs = [f"{s}{i}" for s in ("k", "v", "ks", "vs") for i in range(ns)]
    assert main["names"] == ["q", "table", "lengths", "qscale", *slabs]
    pad = ns - pool.num_slabs
    want_scales = [*pool.k_scale[0], *[pool.k_scale[0][0]] * pad,
                   *pool.v_scale[0], *[pool.v_scale[0][0]] * pad]
    assert [id(a) for a in main["inputs"][4 + 2 * ns:]] == [id(a) for a in want_scales]
    assert main["template"]["T"] == mx.int8 and main["template"]["GB"] == 3
    assert main["tg"] == (64, 1, 1) and main["grid"] == (4 * 64, chunks, 3)
    assert "ksb = ks1; vsb = vs1;" in main["spec"]["source"]
    assert main["spec"]["header"] == _sections(METAL_FILE.read_text())["HEADER"]
    assert len(log) == (2 if chunks > 1 else 1)  # split + merge: no fused Metal body


def test_group_block_stays_within_threadgroup_memory(monkeypatch):
    """int8 pools take the float kernels' register split: at most 8 q heads a threadgroup
    (the CUDA int8 kernel's 16 would overflow Metal's 32 KB merge buffer)."""
    log: list = []
    monkeypatch.setattr(mx.fast, "metal_kernel", KernelContract(log))
    q, pool, batch = random_case([20, 7], 32, 2, 64, 16, mx.int8, slab_blocks=4, seed=4)
    nat = NativeMetal()
    assert nat._case(q, pool.geom) == (METAL_INT8_VARIANT, 8)
    nat._run(q, pool, 0, batch, 0.125, 1)
    assert log[0]["template"]["GB"] == 8 and log[0]["grid"][0] == 2 * 2 * 64


# ---- the guard ----------------------------------------------------------------------------
@pytest.mark.skipif(HAS_METAL, reason="checks the no-Metal decline")
def test_int8_declines_without_metal():
    q, pool, batch = _int8_case()
    reason = NativeMetal().decline(q, pool, batch)
    assert reason is not None and reason.startswith("no Metal device")


def test_int8_shape_declines_come_first():
    q, pool, batch = _int8_case()
    reason = NativeMetal().decline(q[..., :32], pool, batch)
    assert reason is not None and "head_dim" in reason


@pytest.mark.parametrize("use_scales, ok", [(True, True), (False, False)])
def test_probe_accepts_the_contract_and_rejects_a_kernel_without_scales(monkeypatch,
                                                                        use_scales, ok):
    monkeypatch.setattr(mx.fast, "metal_kernel", KernelContract([], use_scales))
    q, pool, batch = _int8_case()
    nat = NativeMetal()
    monkeypatch.setattr(nat, "_device_reason", lambda: None)
    reason = nat.decline(q.astype(mx.bfloat16), pool, batch)
    assert (reason is None) if ok else ("probe" in reason and "wrong" in reason)


def test_compile_failure_declines(monkeypatch):
    def broken(**spec):
        def run(**kw):
            raise RuntimeError("program_source:12: error: use of undeclared identifier")
        return run

    monkeypatch.setattr(mx.fast, "metal_kernel", broken)
    q, pool, batch = _int8_case()
    nat = NativeMetal()
    monkeypatch.setattr(nat, "_device_reason", lambda: None)
    reason = nat.decline(q, pool, batch)
    assert reason.startswith("kernel failed: RuntimeError") and "undeclared" in reason


# ---- the rendered body parses (C++ under a Metal shim; no Metal compiler here) -------------
SHIM = """#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#define device
#define threadgroup
struct half { float v; half(float x) : v(x) {} operator float() const { return v; } };
struct uint3 { unsigned x, y, z; };
typedef unsigned short ushort;
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
template <class X> X simd_shuffle_xor(X v, ushort) { return v; }
using std::exp2; using std::fma; using std::log2; using std::max; using std::min;
"""


def _shim_source(quantized: bool, ns: int = 3) -> str:
    """The direct, split and merge kernels as MLX's metal_kernel would wrap them (inputs
    typed by dtype, the launch geometry as uint3 arguments, template constants), for g++."""
    parts = _sections(METAL_FILE.read_text())
    geo = ("uint3 thread_position_in_threadgroup, uint3 threadgroup_position_in_grid, "
           "uint3 threadgroups_per_grid")
    slabs = [f"const device T* {s}{i}" for s in "kv" for i in range(ns)] + ["const int* k0_shape"]
    if quantized:
        slabs += [f"const device half* {s}{i}" for s in ("ks", "vs") for i in range(ns)]
    ins = ", ".join(["const device TQ* q", "const device int* table", "const int* table_shape",
                     "const device int* lengths", "const device float* qscale", *slabs])
    tmpl = ("template <typename TQ, typename T, int D, int BS, int HKV, int G, int GB, int NS, "
            "int U, int NT, int ST, int MP>")
    direct = f"{tmpl}\nvoid k_direct({ins}, device TQ* out, {geo}) {{\n" + metal_body(
        parts["BODY"], "direct", ns, quantized) + "}\n"
    split = f"{tmpl}\nvoid k_split({ins}, device float* opart, device float* lse, {geo}) {{\n"
    split += metal_body(parts["BODY"], "split", ns, quantized) + "}\n"
    merge = ("template <typename TQ, int D>\nvoid k_merge(const device float* opart, const "
             "device float* lse, const int* lse_shape, device TQ* out, " + geo + ") {\n"
             + parts["MERGE"] + "}\n")
    t = "int8_t" if quantized else "half"
    inst = "".join(
        f"template void k_{k}<half, {t}, {d}, 16, 4, 3, 3, {ns}, 8, 64, 3, 16>"
        f"({ins.replace('TQ', 'half').replace('const device T*', f'const {t}*')}, {outs}, {geo});\n"
        for d in (64, 128) for k, outs in (("direct", "half* out"),
                                           ("split", "float* opart, float* lse")))
    inst += "template void k_merge<half, 64>(const float*, const float*, const int*, half*, "
    inst += "uint3, uint3, uint3);\n"
    return SHIM + parts["HEADER"] + direct + split + merge + inst


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("quantized", [False, True])
def test_rendered_body_parses_as_cpp(quantized, tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text(_shim_source(quantized))
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Werror=return-type", str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]

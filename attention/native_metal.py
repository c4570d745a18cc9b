"""Native pooled decode on Metal through ``mx.fast.metal_kernel``: the CUDA algorithm
(attention/native_cuda.py, "sync" variant) in Metal source.  UNVERIFIED: never compiled or
run on Apple silicon (the project's GPU machines are NVIDIA).  It is guarded like the CUDA
path: ``decline`` answers a reason unless Metal is available and a probe of the exact
variants compiled, ran and returned the right values, so the selector falls back to gather.

int8 pools (kvcache/quant.py; issue 24) run the same body with the scale slabs as inputs
(``ks0..``, ``vs0..``, after the value slabs, as on CUDA): int8 values read in place and
converted in the inner loop, K's scale on the score, V's on the probability
(kernels/pooled_decode.metal).  Equally UNVERIFIED, equally guarded: the probe runs on a
quantized pool against SDPA on its dequantized pages, and the selector's Metal rule keeps
gather (``metal_unverified``) until a Mac has measured it.

Metal specifics: 64 threads per threadgroup (the row-group merge buffer stays within
Metal's 32 KB of threadgroup memory; int8 lanes hold 8 values, so the buffer is the
float16 kernel's), the slab of a block picked by a generated if-chain over the slab inputs
(no pointer tables), scalar loads the compiler may vectorise.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from slabserve.attention.cuda_plan import DEFAULT_PARAMS, PlanParams
from slabserve.attention.cuda_source import MAX_GROUP, REGISTER_VARIANT, group_block
from slabserve.attention.native_cuda import NativeCUDA

METAL_FILE = Path(__file__).parent / "kernels" / "pooled_decode.metal"
METAL_THREADS = 64
# The variant name of an int8 pool's Metal kernel: the register-load split of
# REGISTER_VARIANT with the scale slabs as inputs (UNVERIFIED, see the module docstring).
METAL_INT8_VARIANT = "sync_int8"
KSCALE, VSCALE = "/*KSCALE*/1.0f", "/*VSCALE*/1.0f"


def _sections(text: str) -> dict[str, str]:
    """The ``// ---- NAME ----`` sections of the Metal source."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("// ---- ") and line.rstrip().endswith(" ----"):
            name = line.strip()[8:-5]
            out[name] = ""
        elif name:
            out[name] += line
    return out


def metal_body(template: str, kind: str, ns: int, quantized: bool = False) -> str:
    """Fill the BODY section for a direct or split kernel over ``ns`` slab inputs; with
    ``quantized`` (an int8 pool) also over ``ns`` K and ``ns`` V scale slabs."""
    scales = " ksb = ks{i}; vsb = vs{i};" if quantized else ""
    pick = "\n".join(
        f"    {'if' if i == 1 else 'else if'} (s == {i}) {{ kb = k{i}; vb = v{i};"
        f"{scales.format(i=i)} }}"
        for i in range(1, ns)
    )
    if kind == "direct":
        store = "    out[size_t(b * HQ + h) * D + d] = static_cast<TQ>(a / lsum);"
        empty = ""
    else:
        store = ("    opart[(size_t(b * HQ + h) * nchunk + c) * D + d] = a / lsum;\n"
                 "    if (d == 0) lse[(b * HQ + h) * nchunk + c] = mx + log2(lsum);")
        empty = "    if (tid < GB) lse[(b * HQ + h0 + tid) * nchunk + c] = -INFINITY;"
    if quantized:
        slabs = "    auto ksb = ks0;\n    auto vsb = vs0;"
        kscale, vscale = "float(ksb[row + j])", "float(vsb[row + j])"
    else:
        slabs, kscale, vscale = "", "1.0f", "1.0f"
    return (template.replace("/*SELECT*/", pick).replace("/*STORE*/", store)
            .replace("/*EMPTY*/", empty).replace("/*SCALESLABS*/", slabs)
            .replace(KSCALE, kscale).replace(VSCALE, vscale))


class NativeMetal(NativeCUDA):
    """The native pooled decode path on MLX's Metal backend (unverified), float and int8
    pools."""

    scale_input = True  # the Metal body reads the scale from a one-float input
    dep_input = False  # no in-place K/V writes on Metal
    threads = METAL_THREADS
    kernel_file = METAL_FILE
    common_files = ()
    quant_variants = (METAL_INT8_VARIANT,)

    def __init__(self, params: PlanParams = DEFAULT_PARAMS) -> None:
        super().__init__(params, variant="sync", fused_merge=False)  # no fused Metal body
        self._parts: dict[str, str] | None = None

    def _device_reason(self) -> str | None:
        if not mx.metal.is_available():
            return "no Metal device (mx.metal.is_available() is False)"
        if mx.default_device().type != mx.gpu:
            return f"default device is {mx.default_device()}, not the GPU"
        return None

    def _case(self, q: mx.array, g) -> tuple[str, int]:
        """The register-load split for every case (int8 pools: its scale-slab form), up to
        MAX_GROUP q heads per threadgroup."""
        grp = q.shape[1] // g.kv_heads
        return (METAL_INT8_VARIANT if g.quantized else REGISTER_VARIANT,
                group_block(grp, MAX_GROUP))

    def _header(self, variant: str) -> str:
        return self._parts_of_source()["HEADER"]

    def _parts_of_source(self) -> dict[str, str]:
        if self._parts is None:
            self._parts = _sections(self.kernel_file.read_text())
        return self._parts

    def _body(self, kind: str, ns: int, variant: str, scale: float = 1.0, sb: int = 0) -> str:
        parts = self._parts_of_source()
        if kind == "merge":
            return parts["MERGE"]
        return metal_body(parts["BODY"], kind, ns, variant == METAL_INT8_VARIANT)

    def _compile(self, name: str, names: list, outs: list, body: str, smem: int,
                 header: str):
        return mx.fast.metal_kernel(name=name, input_names=names, output_names=outs,
                                    source=body, header=header)

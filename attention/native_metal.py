"""Native pooled decode on Metal through ``mx.fast.metal_kernel``: the CUDA algorithm
(attention/native_cuda.py, "sync" variant) in Metal source.  UNVERIFIED: never compiled or
run on Apple silicon (the project's GPU machines are NVIDIA).  It is guarded like the CUDA
path: ``decline`` answers a reason unless Metal is available and a probe of the exact
variants compiled, ran and returned the right values, so the selector falls back to gather.

Metal specifics: 64 threads per threadgroup (the row-group merge buffer stays within
Metal's 32 KB of threadgroup memory), the slab of a block picked by a generated if-chain
over the slab inputs (no pointer tables), scalar loads the compiler may vectorise.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from slabserve.attention.cuda_plan import DEFAULT_PARAMS, PlanParams
from slabserve.attention.native_cuda import NativeCUDA

# An int8 pool (kvcache/quant.py) has no Metal kernel (the CUDA one is
# kernels/pooled_decode_int8.cu): the selector's Metal rule keeps gather-SDPA, which
# dequantizes the pages it gathers; forced native declines with this reason.
QUANTIZED_DECLINE = "int8 pool: no Metal kernel (gather dequantizes)"
METAL_FILE = Path(__file__).parent / "kernels" / "pooled_decode.metal"
METAL_THREADS = 64


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


def metal_body(template: str, kind: str, ns: int) -> str:
    """Fill the BODY section for a direct or split kernel over ``ns`` slab inputs."""
    pick = "\n".join(
        f"    {'if' if i == 1 else 'else if'} (s == {i}) {{ kb = k{i}; vb = v{i}; }}"
        for i in range(1, ns)
    )
    if kind == "direct":
        store = "    out[size_t(b * HQ + h) * D + d] = static_cast<TQ>(a / lsum);"
        empty = ""
    else:
        store = ("    opart[(size_t(b * HQ + h) * nchunk + c) * D + d] = a / lsum;\n"
                 "    if (d == 0) lse[(b * HQ + h) * nchunk + c] = mx + log2(lsum);")
        empty = "    if (tid < GB) lse[(b * HQ + h0 + tid) * nchunk + c] = -INFINITY;"
    return (template.replace("/*SELECT*/", pick).replace("/*STORE*/", store)
            .replace("/*EMPTY*/", empty))


class NativeMetal(NativeCUDA):
    """The native pooled decode path on MLX's Metal backend (unverified)."""

    scale_input = True  # the Metal body reads the scale from a one-float input
    threads = METAL_THREADS
    kernel_file = METAL_FILE
    common_files = ()

    def __init__(self, params: PlanParams = DEFAULT_PARAMS) -> None:
        super().__init__(params, variant="sync", fused_merge=False)  # no fused Metal body
        self._parts: dict[str, str] | None = None

    def decline(self, q, pool, batch) -> str | None:
        if pool.geom.quantized:  # before touching a device
            return QUANTIZED_DECLINE
        return super().decline(q, pool, batch)

    def _device_reason(self) -> str | None:
        if not mx.metal.is_available():
            return "no Metal device (mx.metal.is_available() is False)"
        if mx.default_device().type != mx.gpu:
            return f"default device is {mx.default_device()}, not the GPU"
        return None

    def _parts_of_source(self) -> dict[str, str]:
        if self._parts is None:
            self._parts = _sections(self.kernel_file.read_text())
        return self._parts

    def _body(self, kind: str, ns: int, variant: str, scale: float = 1.0, sb: int = 0) -> str:
        parts = self._parts_of_source()
        if kind == "merge":
            return parts["MERGE"]
        return metal_body(parts["BODY"], kind, ns)

    def _compile(self, name: str, names: list, outs: list, body: str, smem: int,
                 header: str):
        return mx.fast.metal_kernel(name=name, input_names=names, output_names=outs,
                                    source=body, header=self._parts_of_source()["HEADER"])

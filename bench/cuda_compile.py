"""Compile the native pooled decode kernels offline with ``nvcc`` (no GPU needed).

``python -m slabserve.bench.cuda_compile [--arch sm_90] [--variants mma,async,lean]``

MLX compiles ``mx.fast.cuda_kernel`` sources with NVRTC on the GPU machine, where a compile
error costs device time.  This wraps each kernel body the way MLX does (the header, then a
``__global__`` function whose inputs are typed from their dtypes, the template arguments as
``constexpr`` / ``using`` lines, then the body), with a minimal stand-in for MLX's ``Shape``,
and runs ``nvcc -cubin`` for the target architecture.  It prints registers, spills and
shared memory per kernel from ``ptxas -v``; ``--sass DIR`` also writes each kernel's SASS.
Compiling is not running: correctness is checked on the GPU (bench.cuda_kernel --check,
tests/test_native_cuda.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from slabserve.attention.cuda_plan import DEFAULT_PARAMS, min_pages
from slabserve.attention.cuda_source import (
    COMMON_FILE,
    INT8_VARIANT,
    KERNEL_FILE,
    MERGE_BODY,
    STAGES,
    THREADS,
    VARIANT_FILES,
    case_variant,
    group_block,
    kernel_body,
    slab_literal,
    unit_tokens,
)

CTYPE = {"f16": "__half", "bf16": "__nv_bfloat16", "f32": "float", "i8": "int8_t"}
PRELUDE = """#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#ifndef INFINITY
#define INFINITY CUDART_INF_F
#endif
namespace mlx::core::cu { struct Shape { int v[8];
  __device__ int operator[](int i) const { return v[i]; } }; }
"""


def nvcc_path() -> str | None:
    """nvcc on PATH, or None."""
    return shutil.which("nvcc")


def wrap(name: str, header: str, body: str, inputs: list[tuple[str, str, bool]],
         outputs: list[tuple[str, str]], consts: list[tuple[str, str]]) -> str:
    """MLX-style source: inputs ``(name, ctype, with_shape)``, outputs ``(name, ctype)``."""
    args = []
    for n, t, shape in inputs:
        args.append(f"const {t}* {n}")
        if shape:
            args.append(f"const __grid_constant__ Shape {n}_shape")
    args += [f"{t}* {n}" for n, t in outputs]
    lines = [f"  using {n} = {v};" if not v.lstrip("-").isdigit() else
             f"  constexpr int {n} = {v};" for n, v in consts]
    return (PRELUDE + header + "\nnamespace mlx::core::cu {\n__global__ void " + name + "("
            + ", ".join(args) + ") {\n" + "\n".join(lines) + "\n" + body + "\n}\n}\n")


def sources(variant: str, dt: str, d: int, bs: int, hq: int, hkv: int, ns: int,
            stages: int = STAGES, qdt: str | None = None):
    """(name, source) of the direct, split and fused kernels and the merge for one case
    (``variant`` as NativeCUDA takes it, resolved per case by cuda_source.case_variant);
    ``dt`` the pool's dtype ("i8": the int8 kernel with its scale slabs), ``qdt`` q's
    (default: ``dt``, float16 for an int8 pool)."""
    import mlx.core as mx

    mdt = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32, "i8": mx.int8}
    qdt = qdt or ("f16" if dt == "i8" else dt)
    v = case_variant(variant, mdt[qdt], mdt[dt], hq // hkv, d)
    files = [COMMON_FILE, KERNEL_FILE, *VARIANT_FILES.get(v, ())]
    header = "\n".join(f.read_text() for f in files)
    grp = hq // hkv
    gb = group_block(grp, 16 if v in ("mma", INT8_VARIANT) else 8)
    t, tq = CTYPE[dt], CTYPE[qdt]
    consts = [("TQ", tq), ("T", t), ("D", str(d)), ("BS", str(bs)), ("HKV", str(hkv)),
              ("G", str(grp)), ("GB", str(gb)), ("NS", str(ns)),
              ("U", str(unit_tokens(gb, v))), ("NT", str(THREADS)), ("ST", str(stages)),
              ("MP", str(min_pages(DEFAULT_PARAMS, bs)))]
    slabs = [(f"k{i}", t, i == 0) for i in range(ns)] + [(f"v{i}", t, False) for i in range(ns)]
    if v == INT8_VARIANT:
        slabs += [(f"{s}{i}", "__half", False) for s in ("ks", "vs") for i in range(ns)]
    ins = [("q", tq, False), ("table", "int", True), ("lengths", "int", False), *slabs]
    out = []
    part = [("opart", "float"), ("lse", "float")]
    for kind, outs in (("direct", [("out", tq)]), ("split", part),
                       ("fused", [*part, ("out", tq)])):
        name = f"k_{v}_{dt}_q{qdt}_d{d}_bs{bs}_{hq}x{hkv}_{kind}"
        kins = ins + ([("counters", "int", False)] if kind == "fused" else [])
        body = kernel_body(ns, kind, v, 0.125, slab_literal(v, COMPILE_SLAB_BLOCKS))
        out.append((name, wrap(name, header, body, kins, outs, consts)))
    mname = f"k_merge_{qdt}_d{d}"
    out.append((mname, wrap(mname, header, MERGE_BODY,
                            [("opart", "float", False), ("lse", "float", True)],
                            [("out", tq)], [("TQ", tq), ("D", str(d))])))
    return out


def compile_one(name: str, src: str, arch: str, sass_dir: Path | None = None) -> tuple[bool, str]:
    """nvcc -cubin; (ok, the compiler's output).  With ``sass_dir``, also the kernel's SASS
    (``cuobjdump -sass``, which must be on PATH) as ``sass_dir/name.sass``."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"{name}.cu"
        f.write_text(src)
        cubin = Path(tmp) / "k.cubin"
        r = subprocess.run([nvcc_path() or "nvcc", "-std=c++17", f"-arch={arch}", "-cubin",
                            "-Xptxas", "-v", "-o", str(cubin), str(f)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0 and sass_dir is not None:
            sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True,
                                  text=True, timeout=300, check=True).stdout
            (sass_dir / f"{name}.sass").write_text(sass)
        return r.returncode == 0, r.stdout + r.stderr


def resources(log: str) -> str:
    """Registers, spill stores and static shared memory per kernel from ``ptxas -v``."""
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    smem = re.findall(r"(\d+) bytes smem", log)
    return f"regs {','.join(regs)} spill {','.join(spill)} static smem {','.join(smem)}"


COMPILE_SLAB_BLOCKS = 4096  # the slab size of variants that compile it in (slab_literal)

CASES = [  # (dtype, head_dim, block, q heads, kv heads, slabs)
    ("f16", 64, 16, 32, 8, 1), ("bf16", 64, 16, 14, 2, 4), ("f16", 128, 32, 32, 8, 2),
    ("bf16", 128, 16, 8, 8, 1), ("f16", 64, 64, 64, 4, 8), ("f16", 64, 16, 16, 1, 1),
    ("f32", 64, 16, 32, 8, 1), ("i8", 64, 16, 32, 8, 2), ("i8", 128, 32, 14, 2, 1),
    ("i8", 64, 16, 64, 4, 4),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slabserve bench cuda-compile")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--variants", default="mma,async,lean")
    ap.add_argument("--sass", type=Path, default=None,
                    help="write each kernel's SASS here (needs cuobjdump on PATH, e.g. from "
                    "the nvidia-cuda-cuobjdump wheel)")
    a = ap.parse_args(argv)
    if not nvcc_path():
        print("nvcc not found: nothing to compile")
        return 1
    if a.sass is not None:
        if not shutil.which("cuobjdump"):
            print("cuobjdump not found: no SASS")
            return 1
        a.sass.mkdir(parents=True, exist_ok=True)
    bad = 0
    for variant in a.variants.split(","):
        for dt, d, bs, hq, hkv, ns in CASES:
            for name, src in sources(variant, dt, d, bs, hq, hkv, ns):
                ok, log = compile_one(name, src, a.arch, a.sass)
                bad += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name}: {resources(log)}", flush=True)
                if not ok:
                    print(log[-3000:])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

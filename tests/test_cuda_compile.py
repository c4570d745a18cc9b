"""The CUDA kernel sources compile offline with nvcc (sm_90) where nvcc is installed, so a
syntax or template error is caught without a GPU.  Running them is checked on the GPU
(tests/test_native_cuda.py)."""

from __future__ import annotations

import shutil

import pytest

from slabserve.bench.cuda_compile import compile_one, nvcc_path, resources, sources

needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc (CUDA toolkit)")


@needs_nvcc
@pytest.mark.parametrize("variant, dt, d, hq, hkv", [("mma", "bf16", 64, 14, 2),
                                                      ("async", "f16", 128, 32, 8),
                                                      ("async", "f32", 64, 32, 8),
                                                      ("lean", "f16", 64, 32, 8),
                                                      ("lean", "bf16", 64, 16, 8),
                                                      ("lean", "f16", 128, 32, 8),
                                                      ("auto", "i8", 64, 32, 8),
                                                      ("auto", "i8", 128, 14, 2),
                                                      ("auto", "i8", 64, 64, 4)])
def test_kernel_sources_compile_without_spills(variant, dt, d, hq, hkv):
    name, src = sources(variant, dt, d, 16, hq, hkv, 2)[2]  # the fused kernel, 2 slabs
    ok, log = compile_one(name, src, "sm_90")
    assert ok, log[-2000:]
    info = resources(log)
    assert "regs" in info and "spill 0" in info, info


@needs_nvcc
def test_compile_error_is_reported():
    name, src = sources("mma", "f16", 64, 16, 32, 8, 1)[0]
    ok, log = compile_one(name, src.replace("pooled_decode_mma<", "pooled_decode_mmma<"),
                          "sm_90")
    assert not ok and "pooled_decode_mmma" in log


@needs_nvcc
@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="needs cuobjdump")
def test_sass_of_a_kernel_is_written(tmp_path):
    """``--sass``: the compiled kernel's SASS lands in the folder, with its cp.async copies."""
    name, src = sources("lean", "f16", 64, 16, 32, 8, 2)[1]  # the split kernel
    ok, log = compile_one(name, src, "sm_90", tmp_path)
    assert ok, log[-2000:]
    assert "LDGSTS" in (tmp_path / f"{name}.sass").read_text()


@needs_nvcc
@pytest.mark.parametrize("qdt", ["f16", "bf16", "f32"])
def test_int8_kernels_compile_for_every_query_dtype(qdt):
    """The int8 kernel (i8 pool, any q dtype): direct, split, fused and the merge."""
    for name, src in sources("auto", "i8", 64, 16, 32, 8, 2, qdt=qdt):
        ok, log = compile_one(name, src, "sm_90")
        assert ok, log[-2000:]
        assert "spill 0" in resources(log) or "merge" in name, resources(log)

"""Native pooled decode on Metal (unverified source): what can be checked without Apple
silicon — source sections, generated bodies, launch plumbing, and the decline reason."""

from __future__ import annotations

import mlx.core as mx
import pytest

from slabserve.attention.native_metal import METAL_FILE, NativeMetal, _sections, metal_body

HAS_METAL = mx.metal.is_available()


def test_sections_present():
    parts = _sections(METAL_FILE.read_text())
    assert set(parts) == {"HEADER", "BODY", "MERGE"}
    assert "/*SELECT*/" in parts["BODY"] and "/*STORE*/" in parts["BODY"]
    assert "simd_shuffle_xor" in parts["BODY"]


@pytest.mark.parametrize("kind", ["direct", "split"])
def test_body_fills_markers(kind):
    body = metal_body(_sections(METAL_FILE.read_text())["BODY"], kind, 3)
    for marker in ("/*SELECT*/", "/*STORE*/", "/*EMPTY*/"):
        assert marker not in body
    assert "if (s == 1) { kb = k1; vb = v1; }" in body
    assert "else if (s == 2) { kb = k2; vb = v2; }" in body and "k3" not in body
    assert ("lse[" in body) == (kind == "split")


@pytest.mark.skipif(HAS_METAL, reason="checks the no-Metal decline")
def test_declines_without_metal():
    from slabserve.bench.cuda_kernel import make_case

    pool, batch, q = make_case((3, 40), 8, 2, 64, 16, mx.float16, 8)
    reason = NativeMetal().decline(q, pool, batch)
    assert reason is not None and "Metal" in reason


def test_shape_declines_come_first():
    from slabserve.bench.cuda_kernel import make_case

    pool, batch, q = make_case((3, 40), 8, 2, 64, 16, mx.float16, 8)
    reason = NativeMetal().decline(q[..., :32], pool, batch)
    assert reason is not None and "head_dim" in reason


def test_metal_launch_plumbing(monkeypatch):
    from slabserve.bench.cuda_kernel import make_case

    calls: list = []

    def fake_kernel(**spec):
        def run(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
            calls.append(dict(spec=spec, inputs=inputs, grid=grid, tg=threadgroup))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes,
                                                         strict=True)]
        return run

    monkeypatch.setattr(mx.fast, "metal_kernel", fake_kernel)
    pool, batch, q = make_case((5, 300, 1029), 32, 8, 128, 16, mx.float16, 24)
    out = NativeMetal()._run(q, pool, 0, batch, 0.1, 3)
    assert out.shape == q.shape
    main, merge = calls
    assert main["grid"] == (8 * 64, 3, 3) and main["tg"] == (64, 1, 1)
    assert "header" in main["spec"] and "slabserve" in main["spec"]["header"]
    assert "else if (s == 3)" in main["spec"]["source"]  # 4 slabs in the pool
    assert merge["spec"]["output_names"] == ["out"]

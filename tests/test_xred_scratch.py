"""The score scratch of the lean kernel (attention/kernels/pooled_decode.cu,
consume_unit_x), its index arithmetic replayed in Python: every partial a lane reads back
is the one written for its score, row groups of a warp never share a float, the scratch
stays inside the warp's U pieces of its K stage, and the per-thread write pointers plus
compile-time offsets land where the swizzled slot says.  (Running the kernels needs CUDA:
bench.cuda_kernel --check.)"""

import pytest

U, PIECE = 4, 128


def at(area: int, f: int, pstride: int) -> int:
    x = area + f
    return (x >> 7) * pstride + (x & 127)


@pytest.mark.parametrize("tpr, gb", [(8, 4), (8, 2), (16, 4)])  # D 64 / 64 / 128
def test_scratch_slots_round_trip(tpr, gb):
    n, rw, pstride = gb * U, 32 // tpr, 128 * 4  # pstride: NT * 4 floats at 128 threads
    assert rw * n * tpr <= U * PIECE

    def slot(sl, rgw):
        return sl ^ rgw

    written = {}
    for rgw in range(rw):
        area = rgw * n * tpr
        for lane in range(tpr):
            wp = [at(area, lane + (b ^ rgw) * tpr, pstride) for b in range(4)]
            for sl in range(n):
                addr = at(area, slot(sl, rgw) * tpr + lane, pstride)
                hi = (sl & ~3) * tpr  # the kernel's pointer + compile-time offset
                assert wp[sl & 3] + (hi >> 7) * pstride + (hi & 127) == addr
                assert addr not in written, "two partials share a float"
                assert (addr // pstride) < U and addr % pstride < PIECE
                written[addr] = (rgw, sl, lane)
    for rgw in range(rw):
        area = rgw * n * tpr
        for lane in range(tpr):
            for k in range(n // tpr):
                sc = lane + tpr * k  # the score this lane owns
                base = at(area, slot(sc, rgw) * tpr, pstride)
                got = [written[base + i] for i in range(tpr)]
                assert got == [(rgw, sc, i) for i in range(tpr)]


@pytest.mark.parametrize("tpr, gb", [(8, 4), (16, 4)])
def test_swizzled_stores_of_a_warp_hit_distinct_banks(tpr, gb):
    """The row groups of a warp store the same score slot at once: with the XOR swizzle
    the 32 lanes still hit 32 banks (pieces are pstride = 512 floats apart: same bank)."""
    n, rw, pstride = gb * U, 32 // tpr, 512
    for sl in range(n):
        banks = {at(rgw * n * tpr, (sl ^ rgw) * tpr + lane, pstride) % 32
                 for rgw in range(rw) for lane in range(tpr)}
        assert len(banks) == 32

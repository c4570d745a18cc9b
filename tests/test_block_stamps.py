"""The arithmetic of the GPU diagnostics (experiments.block_stamps, bench.cuda_kernel's
marginal per-layer cost) on synthetic data, and the timing marks' places in the shipped
kernel source; the measurements themselves need CUDA."""

import mlx.core as mx
import numpy as np
import pytest
from cuda_fakes import FakeKernel

from experiments.block_stamps import (
    FIELDS,
    MARKS,
    MARKS_AT,
    instrument,
    median_summary,
    persistence,
    summarize_launch,
)
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.bench.cuda_kernel import chain, int_cells


def test_summarize_launch_block_figures():
    # marks 0 start, 1 issued, 2 first data, 3 loop end, 4 entry, 5 lengths, 6 q, 7 -,
    # then end and SM (ns); the third block had an empty chunk (no marks 1-3)
    st = np.array([[100, 1150, 2100, 5100, 200, 400, 900, 0, 6100, 3],
                   [600, 1650, 2600, 9600, 700, 900, 1400, 0, 10600, 5],
                   [300, 0, 0, 0, 400, 0, 0, 0, 900, 3]], dtype=np.int64)
    assert st.shape[1] == FIELDS
    r = summarize_launch(st.reshape(-1))
    assert r["blocks"] == 3 and r["sms"] == 2 and r["sm_blocks"] == "1-2"
    assert r["span"] == 10.5  # first start 100 ns, last end 10600 ns
    assert r["start_max"] == 0.5
    assert r["first_data_p50"] == 2.0  # both full blocks: 2000 ns to their first stage
    assert r["issued_p50"] == 1.05 and r["entry_p50"] == 0.1
    assert r["lengths_p50"] == 0.3 and r["q_p50"] == 0.8
    assert r["loop_p50"] == 5.0 and r["loop_max"] == 7.0  # 3000 and 7000 ns
    # SM 3 holds two blocks (the crowded one), SM 5 one
    assert r["loop_p50_crowded"] == 3.0 and r["loop_p50_other"] == 7.0
    assert r["tail_max"] == 1.0
    assert r["block_max"] == 10.0


def test_median_summary_keeps_strings():
    a = dict(span=1.0, sm_blocks="3-4")
    b = dict(span=3.0, sm_blocks="4-4")
    c = dict(span=2.0, sm_blocks="4-4")
    assert median_summary([a, b, c]) == dict(span=2.0, sm_blocks="3-4")


def test_chain_cycles_over_layers():
    seen = []
    fn = chain(lambda x, i: seen.append(i) or x + i, 0, 3, calls=7)
    assert fn() == 0 + 1 + 2 + 0 + 1 + 2 + 0
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    seen.clear()
    chain(lambda x, i: seen.append(i) or x, 0, 3)()
    assert seen == [0, 1, 2]


def test_int_cells():
    assert int_cells("8:4096:8,1:32768:0") == [(8, 4096, 8), (1, 32768, 0)]
    assert int_cells("16:1024,") == [(16, 1024)]


@pytest.mark.parametrize("fused", [False, True])
def test_stamped_kernel_plumbing(monkeypatch, fused):
    """The stamped main kernel gets one more output (FIELDS int64 per block), which goes
    to ``nat.stamps``; NativeCUDA sees the outputs it expects (merge launch included)."""
    from experiments.block_stamps import StampedCUDA
    from slabserve.bench.cuda_kernel import make_case

    launches: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(launches, **kw))
    pool, batch, q = make_case((600, 3000), 32, 8, 64, 16, mx.float16, 64)
    nat = StampedCUDA(fused_merge=fused, gpu_meta=True)
    out = nat._run(q, pool, 0, batch, 0.125, 4)
    assert out.shape == q.shape
    main = launches[0]
    assert main["spec"]["output_names"][-1] == "stamps"
    assert main["spec"]["name"].endswith("_stamped")
    assert "SLABSERVE_STAMP_MARKS" in main["spec"]["header"]
    blocks = 2 * 8 * 4  # sequences x kv-head blocks x chunks
    assert len(nat.stamps) == 1 and nat.stamps[0].shape == (blocks * FIELDS,)
    assert nat.stamps[0].dtype == mx.int64
    names = main["spec"]["input_names"]
    table = main["inputs"][names.index("table")]
    assert table is not batch.table_array and mx.array_equal(table, batch.table_array).item()
    assert len(launches) == (1 if fused else 2)
    if not fused:  # the merge launch takes the partials only, and is not stamped
        assert len(launches[1]["inputs"]) == 2 and "stamps" not in launches[1]["spec"][
            "output_names"]


def _launch(rng, slow_sm: dict, blocks: int = 48, sms: int = 12) -> np.ndarray:
    """Synthetic stamps: block i on SM i % sms (4 per SM), loop 50 us + noise (+ the SM's
    extra), every mark set."""
    st = np.zeros((blocks, FIELDS), dtype=np.int64)
    for i in range(blocks):
        sm = i % sms
        loop = 50_000 + rng.normal(0, 500) + slow_sm.get(sm, 0)
        st[i, 0], st[i, 1], st[i, 2] = 0, 2_000, 6_000
        st[i, 3] = 6_000 + loop
        st[i, 4:7] = (100, 300, 800)
        st[i, MARKS] = st[i, 3] + 1_500
        st[i, MARKS + 1] = sm
    return st.reshape(-1)


def test_persistence_tells_slow_sms_from_noise():
    rng = np.random.default_rng(0)
    slow = {3: 6_000, 7: 4_000, 9: -3_000}
    r = persistence([_launch(rng, slow) for _ in range(10)])
    assert r["r_sm"] > 0.9 and r["same_sm"] == 1.0
    assert 4.0 < r["sm_resid_max"] < 7.0  # SM 3's ~6 us over the median
    noise = persistence([_launch(rng, {}) for _ in range(10)])
    assert abs(noise["r_sm"]) < 0.8 and noise["sm_resid_max"] < 1.5


@pytest.mark.parametrize("variant", ["auto", "async", "mma"])
def test_marks_find_their_places_in_the_shipped_source(variant):
    """Every mark of MARKS_AT goes into the shipped FMA kernel exactly once (a kernel
    change that moves one fails here, not on the GPU), the prelude defines the marks, and
    ``finish_noinline`` turns the last-block merge into a call."""
    header = NativeCUDA()._header(variant)
    assert "SLABSERVE_MARK" not in header  # the served kernel has no marks
    got = instrument(header)
    assert got.startswith("#define SLABSERVE_STAMP_MARKS")
    for k in (1, 2, 3, 4, 5):
        assert got.count(f"SLABSERVE_MARK({k});") == 1
    assert got.count("SLABSERVE_MARK_AFTER(6,") == 1
    assert "__noinline__ void finish_split(" in instrument(header, finish_noinline=True)
    with pytest.raises(ValueError, match="kernel source changed"):
        instrument(header.replace(MARKS_AT[1][0], ""))

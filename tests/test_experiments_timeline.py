"""experiments.timeline's trace arithmetic on a synthetic Chrome trace (the profiling
itself needs CUDA and PyTorch)."""

from experiments.timeline import _median_per_layer, summarize


def _x(name, cat, ts, dur):
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur}


def test_summarize_splits_wall_into_lead_busy_gap_tail():
    events = [
        _x("eval0", "user_annotation", 100.0, 100.0),          # [100, 200]
        _x("slabserve_pooled_split_ns2_ab", "kernel", 130.0, 30.0),   # lead 30
        _x("slabserve_pooled_merge_ns0_cd", "kernel", 165.0, 5.0),    # gap 5
        _x("sm80_flash_fprop_wmma_f16", "kernel", 170.0, 10.0),       # back to back
        _x("eval1", "user_annotation", 300.0, 50.0),
        _x("slabserve_pooled_fused_ns2_ef", "kernel", 310.0, 20.0),
        _x("copy_kernel", "kernel", 340.0, 4.0),                      # gap 10, tail 6
        _x("stray", "kernel", 400.0, 10.0),                           # outside both evals
        _x("eval2", "user_annotation", 500.0, 10.0),                  # no kernel: dropped
        {"name": "eval3", "cat": "user_annotation", "ph": "i", "ts": 1.0},  # not a span
    ]
    first, second = summarize(events)
    assert first == dict(wall=100.0, lead=30.0, gap=5.0, tail=20.0, kernels=3,
                         busy_split=30.0, busy_merge=5.0, busy_sdpa=10.0)
    assert first["wall"] == (first["lead"] + sum(v for k, v in first.items()
                                                 if k.startswith("busy_"))
                             + first["gap"] + first["tail"])
    assert second == dict(wall=50.0, lead=10.0, gap=10.0, tail=6.0, kernels=2,
                          busy_fused=20.0, busy_other=4.0)


def test_median_per_layer_fills_missing_kinds_with_zero():
    runs = [dict(wall=160.0, kernels=32, busy_split=80.0),
            dict(wall=320.0, kernels=32),
            dict(wall=480.0, kernels=32, busy_split=96.0)]
    got = _median_per_layer(runs, 16)
    assert got == dict(wall=20.0, kernels=32, busy_split=5.0)

"""The on/off/auto switches of host math and the CPU linear layout: their environment
variables (one reader in slabserve.env, ``_on_off_auto``) and their ``serve`` flags."""

from __future__ import annotations

import pytest

from slabserve import env

SWITCHES = [("SLABSERVE_HOST_MATH", env.host_math),
            ("SLABSERVE_LINEAR_LAYOUT", env.linear_layout)]


@pytest.mark.parametrize("var,read", SWITCHES)
@pytest.mark.parametrize("raw,want", [(None, None), ("", None), ("auto", None), ("on", True),
                                      ("1", True), ("off", False), ("0", False)])
def test_switch_values(monkeypatch, var, read, raw, want):
    if raw is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, raw)
    assert read() is want


@pytest.mark.parametrize("var,read", SWITCHES)
@pytest.mark.parametrize("raw", ["sometimes", "sideways"])
def test_switch_rejects_garbage(monkeypatch, var, read, raw):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=var):
        read()


@pytest.mark.parametrize("flag,field", [("--host-math", "host_math"),
                                        ("--linear-layout", "linear_layout")])
def test_cli_flag_reaches_runner_config(flag, field):
    from slabserve.serve import configs, parser

    var = "SLABSERVE_" + field.upper()
    for env_value in (None, "off"):
        mp = pytest.MonkeyPatch()
        if env_value is None:
            mp.delenv(var, raising=False)
        else:
            mp.setenv(var, env_value)
        try:
            auto = env_value is None  # unset = auto = on; the environment's off otherwise
            for value, want in (("on", True), ("off", False), ("auto", auto)):
                _, serve = configs(parser().parse_args([flag, value]))
                assert getattr(serve.runner, field) is want
            _, serve = configs(parser().parse_args([]))
            assert getattr(serve.runner, field) is auto
        finally:
            mp.undo()


@pytest.mark.parametrize("gpu", [True, False])
def test_decode_stages_compiled_on_a_gpu_unless_enforce_eager(monkeypatch, gpu):
    from slabserve import serve
    from slabserve.serve import configs, parser

    monkeypatch.setattr(serve, "_gpu", lambda: gpu)
    assert configs(parser().parse_args([]))[1].runner.compile_decode is gpu
    assert configs(parser().parse_args(["--enforce-eager"]))[1].runner.compile_decode is False


@pytest.mark.parametrize("gpu", [True, False])
def test_async_scheduling_on_a_gpu_unless_turned_off(monkeypatch, gpu):
    from slabserve import serve
    from slabserve.serve import configs, parser

    monkeypatch.setattr(serve, "_gpu", lambda: gpu)
    sched = lambda *flags: configs(parser().parse_args(list(flags)))[1].scheduler  # noqa: E731
    assert sched().async_scheduling is gpu
    assert sched("--no-async-scheduling").async_scheduling is False
    assert sched("--async-scheduling").async_scheduling is True


def test_cuda_graph_max_bs_defaults_to_max_running():
    from slabserve.serve import configs, parser

    runner = lambda *flags: configs(parser().parse_args(list(flags)))[1].runner  # noqa: E731
    assert runner().capture_max_batch == 64
    assert runner("--max-running", "12").capture_max_batch == 12
    assert runner("--max-running", "12", "--cuda-graph-max-bs", "0").capture_max_batch == 0
    with pytest.raises(ValueError, match="capture_max_batch"):
        runner("--cuda-graph-max-bs", "-1")


def test_kv_preallocate_defaults_to_the_gpu(model_root):
    """Off on this CPU (the pool grows a slab at a time), on with the flag; a runner over a
    preallocated pool holds every slab from the start."""
    import mlx.core as mx
    from mlx_lm.utils import load
    from models import make

    from slabserve.engine.runner import ModelRunner
    from slabserve.serve import configs, parser

    cache = lambda *flags: configs(parser().parse_args(list(flags)))[1].cache  # noqa: E731
    assert cache().preallocate is (mx.default_device().type == mx.gpu)
    assert cache("--kv-preallocate").preallocate and not cache("--no-kv-preallocate").preallocate
    model = load(str(make(model_root, "llama-gqa")))[0]
    runner = ModelRunner(model, cache("--kv-preallocate", "--kv-budget", "4M"))
    a = runner.allocator
    assert runner.pool.num_slabs == a.num_slabs == a.max_slabs == 1
    assert a.capacity == a.max_blocks == 4 * 2**20 // runner.geom.block_bytes

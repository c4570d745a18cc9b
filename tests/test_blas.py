"""OpenBLAS launcher (issue 8): the decision, unit-level with injected paths and finders;
then, in subprocesses with the preload, MLX products against numpy and generation against
mlx-lm; and the real re-exec through ``python -m slabserve.cli info``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slabserve import blas, env, mlxmem
from slabserve.blas import Backend, Reason

ROOT = Path(__file__).resolve().parent.parent
LIB = blas.openblas_path()
needs_openblas = pytest.mark.skipif(
    LIB is None or not sys.platform.startswith("linux"),
    reason="OpenBLAS not installed (apt-get install libopenblas0-pthread)",
)


# ---- finding the library ---------------------------------------------------------------
def test_find_openblas_takes_first_loadable_candidate(tmp_path):
    a, b = tmp_path / "a" / "libopenblas.so.0", tmp_path / "b" / "libopenblas.so.0"
    b.parent.mkdir()
    b.write_bytes(b"x")
    cands = [str(a), str(b)]
    exists = os.path.exists
    assert blas.find_openblas(cands, lambda _: None, exists) == str(b)
    a.parent.mkdir()
    a.write_bytes(b"x")
    assert blas.find_openblas(cands, lambda _: None, exists) == str(a)


def test_find_openblas_falls_back_to_find_library_and_rejects_ilp64():
    def finder(libs):
        return lambda name: libs.get(name)

    never = lambda _: False  # noqa: E731
    assert blas.find_openblas([], finder({}), never) is None
    assert blas.find_openblas(["/nope"], finder({"openblas": "libopenblas.so.0"}),
                              never) == "libopenblas.so.0"
    assert blas.find_openblas([], finder({"openblas": "libopenblas64.so.0"}), never) is None


def test_override_wins_only_when_loadable(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    other = tmp_path / "other.so"
    other.write_bytes(b"x")
    exists = os.path.exists
    assert blas.find_openblas([str(other)], lambda _: None, exists, override=lib) is None
    lib.write_bytes(b"x")
    assert blas.find_openblas([str(other)], lambda _: None, exists, override=lib) == str(lib)


def test_default_loadable_checks_elf_architecture(tmp_path):
    head = Path(sys.executable).read_bytes()[:64]
    good, wrong, text = tmp_path / "good.so", tmp_path / "wrong.so", tmp_path / "text.so"
    good.write_bytes(head)
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    other = (machine + 1).to_bytes(2, "little" if head[5] == 1 else "big")
    wrong.write_bytes(head[:18] + other + head[20:])
    text.write_text("not a library")
    cands = [str(text), str(wrong), str(good)]
    assert blas.find_openblas(cands, lambda _: None) == str(good)


def test_candidate_paths_cover_distributions():
    paths = blas.candidate_paths(["aarch64-linux-gnu"])
    assert paths[0] == "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"
    for p in ("/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
              "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
              "/usr/lib64/libopenblasp.so.0", "/usr/lib/libopenblas.so.0"):
        assert p in paths
    assert not [p for p in paths if "openblas64" in p]
    assert len(paths) == len(set(paths))


def test_mlx_backend_from_installed_files(tmp_path):
    pkg = tmp_path / "mlx"
    pkg.mkdir()
    (tmp_path / "mlx_cpu-0.32.4.dist-info").mkdir()
    assert blas.mlx_backend("linux", lambda: pkg) is Backend.CPU
    (tmp_path / "mlx_cuda_13-0.32.4.dist-info").mkdir()
    assert blas.mlx_backend("linux", lambda: pkg) is Backend.CUDA
    assert blas.mlx_backend("linux", lambda: None) is Backend.NONE
    assert blas.mlx_backend("darwin", lambda: pkg) is Backend.METAL


# ---- the decision --------------------------------------------------------------------------
OB = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
BASE = dict(platform_name="linux", backend=Backend.CPU, disabled=False, reexeced_here=False,
            provider=None, library=OB, launcher=True)


@pytest.mark.parametrize("change, reason", [
    ({}, Reason.REEXEC),
    ({"platform_name": "darwin"}, Reason.NOT_LINUX),
    ({"backend": Backend.CUDA}, Reason.GPU_BACKEND),
    ({"backend": Backend.NONE}, Reason.NO_MLX),
    ({"library": None}, Reason.NOT_FOUND),
    ({"disabled": True}, Reason.DISABLED),
    ({"launcher": False}, Reason.LOAD_GLOBAL),
    ({"launcher": False, "mlx_imported": True}, Reason.NOT_LAUNCHER),
    ({"launcher": False, "provider": OB, "loaded_here": True}, Reason.LOADED_GLOBAL),
    ({"reexeced_here": True}, Reason.PRELOAD_IGNORED),  # loop guard: never a second exec
    ({"reexeced_here": True, "provider": OB}, Reason.PRELOADED),
    ({"provider": OB, "disabled": True}, Reason.ALREADY_LOADED),  # the process is the truth
    ({"provider": "/opt/intel/lib/libmkl_rt.so.2"}, Reason.OTHER_BLAS),
])
def test_decide(change, reason):
    d = blas.decide(**{**BASE, **change})
    assert d.reason is reason
    assert d.reexec == (reason is Reason.REEXEC)
    if reason in (Reason.REEXEC, Reason.LOAD_GLOBAL):
        assert d.library == OB


@pytest.fixture
def fake_process(monkeypatch):
    """Linux CPU MLX, the slabserve launcher, nothing preloaded; returns a setter."""
    state = {"provider": None, "library": OB}
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "mlx_backend", lambda *a, **k: Backend.CPU)
    monkeypatch.setattr(blas, "is_launcher", lambda: True)
    monkeypatch.setattr(blas, "global_cblas_provider", lambda: state["provider"])
    monkeypatch.setattr(blas, "openblas_path", lambda: state["library"])
    monkeypatch.setattr(blas, "_logged", set())
    monkeypatch.setattr(blas, "_loaded_here", None)
    for var in ("SLABSERVE_NO_OPENBLAS", env.BLAS_REEXEC_MARKER):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/other/libfoo.so")
    return state


class _Exec(Exception):
    pass


def _recording_exec(calls):
    def execve(path, argv, environ):
        calls.append((path, argv, environ))
        raise _Exec

    return execve


def test_prepare_process_reexecs_once_then_stops(fake_process, monkeypatch):
    calls: list = []
    with pytest.raises(_Exec):
        blas.prepare_process(_recording_exec(calls))
    (path, argv, environ), = calls
    assert path == sys.executable and argv[0] == sys.executable
    assert environ["LD_PRELOAD"] == f"{OB} /other/libfoo.so"
    assert environ[env.BLAS_REEXEC_MARKER] == str(os.getpid())
    # what the re-executed process sees (same pid): preload worked, or it did not
    monkeypatch.setenv(env.BLAS_REEXEC_MARKER, str(os.getpid()))
    fake_process["provider"] = OB
    assert blas.prepare_process(_recording_exec(calls)).reason is Reason.PRELOADED
    fake_process["provider"] = None
    assert blas.prepare_process(_recording_exec(calls)).reason is Reason.PRELOAD_IGNORED
    assert len(calls) == 1
    # a child process (other pid) that inherited the marker decides afresh
    monkeypatch.setenv(env.BLAS_REEXEC_MARKER, str(os.getpid() + 1))
    with pytest.raises(_Exec):
        blas.prepare_process(_recording_exec(calls))


def test_missing_library_logs_install_hint_once(fake_process, caplog):
    fake_process["library"] = None
    calls: list = []
    with caplog.at_level(logging.INFO, logger="slabserve.blas"):
        for _ in range(3):
            assert blas.prepare_process(_recording_exec(calls)).reason is Reason.NOT_FOUND
    assert calls == []
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "libopenblas0-pthread" in warned[0].getMessage()


def test_opt_out_and_not_launcher_do_not_exec(fake_process, monkeypatch):
    calls: list = []
    loads: list = []

    def load(lib):  # what dlopen(RTLD_GLOBAL) does to the process
        loads.append(lib)
        fake_process["provider"] = lib
        blas._loaded_here = lib

    monkeypatch.setenv("SLABSERVE_NO_OPENBLAS", "1")
    monkeypatch.setattr(blas, "is_launcher", lambda: False)
    assert blas.prepare_process(_recording_exec(calls), load).reason is Reason.DISABLED
    monkeypatch.delenv("SLABSERVE_NO_OPENBLAS")
    monkeypatch.setitem(sys.modules, "mlx.core", sys.modules.get("mlx.core", object()))
    assert blas.prepare_process(_recording_exec(calls), load).reason is Reason.NOT_LAUNCHER
    monkeypatch.delitem(sys.modules, "mlx.core")
    assert blas.prepare_process(_recording_exec(calls), load).reason is Reason.LOADED_GLOBAL
    assert calls == [] and loads == [OB]


def test_reexec_env_dedups_and_keeps_others():
    e = blas.reexec_env({"LD_PRELOAD": f"/a.so:{OB} /b.so", "X": "1"}, OB, 42)
    assert e["LD_PRELOAD"] == f"{OB} /a.so /b.so" and e["X"] == "1"
    assert e[env.BLAS_REEXEC_MARKER] == "42"
    assert blas.reexec_env({}, OB, 1)["LD_PRELOAD"] == OB


def test_mapped_libraries_and_classify():
    maps = ("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/openblas-pthread/"
            "libopenblasp-r0.3.21.so\n7f01-7f02 r--p 00000000 08:01 12 /usr/lib/x86_64-linux-"
            "gnu/openblas-pthread/libopenblasp-r0.3.21.so\n7f02-7f03 rw-p 00000000 00:00 0 \n"
            "7f03-7f04 r-xp 00000000 08:01 9 /venv/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n")
    assert blas.mapped_libraries("openblas", maps) == [
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so"]
    bundled = "/venv/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
    assert blas.mapped_libraries("libblas", maps) == [bundled]
    assert blas.classify(bundled) == "reference"
    assert blas.classify("/usr/lib64/libopenblasp.so.0") == "openblas"
    assert blas.classify("/x/libmkl_rt.so") == "mkl" and blas.classify(None) == "reference"


# ---- MLX memory ---------------------------------------------------------------------------
def test_configure_memory_sets_cache_limit():
    import mlx.core as mx

    original = mx.set_cache_limit(1 << 20)
    try:
        s = mlxmem.configure_memory(123 << 20)
        assert (s.cache_limit_bytes, s.previous_bytes, s.source) == (123 << 20, 1 << 20, "explicit")
        d = mlxmem.configure_memory(None)
        assert d.previous_bytes == 123 << 20 and mx.set_cache_limit(0) == d.cache_limit_bytes
        if mx.default_device() == mx.cpu:
            assert d.source == "default"
            assert d.cache_limit_bytes == min(mlxmem.default_cache_limit(), mx.get_memory_limit())
        with pytest.raises(ValueError):
            mlxmem.configure_memory(-1)
    finally:
        mx.set_cache_limit(original)
    assert mlxmem.default_cache_limit(8 << 30, 0.25) == 2 << 30


@pytest.mark.parametrize("raw, want", [("8G", 8 << 30), ("512mib", 512 << 20), ("0", 0),
                                       ("1.5g", 3 << 29), ("4096", 4096), (None, None)])
def test_env_cache_limit(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("SLABSERVE_MLX_CACHE_LIMIT", raising=False)
    else:
        monkeypatch.setenv("SLABSERVE_MLX_CACHE_LIMIT", raw)
    assert env.mlx_cache_limit() == want


def test_env_cache_limit_rejects_garbage(monkeypatch):
    monkeypatch.setenv("SLABSERVE_MLX_CACHE_LIMIT", "lots")
    with pytest.raises(ValueError):
        env.mlx_cache_limit()


# ---- in real processes ------------------------------------------------------------------
def _child_env(tmp_path: Path, preload: str | None, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "SLABSERVE_NO_OPENBLAS", "SLABSERVE_OPENBLAS",
                      env.BLAS_REEXEC_MARKER)}
    if preload:
        e["LD_PRELOAD"] = preload
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("SLABSERVE_CACHE_DIR", str(tmp_path))
    return {**e, **extra}


def _run_json(code: str, environ: dict[str, str]) -> dict:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


MATMUL = """
    import json
    import numpy as np
    import mlx.core as mx
    from slabserve import blas
    rng = np.random.default_rng(0)
    cases = [((1, 896), (896, 4864)), ((37, 64), (64, 33)), ((256, 896), (896, 128)),
             ((3, 17, 40), (3, 40, 9))]
    worst = []
    for sa, sb in cases:
        a = rng.standard_normal(sa).astype(np.float32)
        b = rng.standard_normal(sb).astype(np.float32)
        for transpose in (False, True):
            x, y = (a, b) if not transpose else (np.ascontiguousarray(a.swapaxes(-1, -2)), b)
            got = np.array(mx.array(x).swapaxes(-1, -2) @ mx.array(y)) if transpose else \\
                np.array(mx.array(x) @ mx.array(y))
            ref = a.astype(np.float64) @ b.astype(np.float64)
            scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
            worst.append(float(np.max(np.abs(got - ref) / scale) / sa[-1]))
    print(json.dumps({"status": blas.status(), "worst": max(worst), "n": len(worst)}))
"""


@needs_openblas
def test_mlx_matmul_under_openblas_equals_numpy(tmp_path):
    out = _run_json(MATMUL, _child_env(tmp_path, LIB))
    assert out["status"]["blas"] == "openblas", out["status"]
    assert out["n"] == 8
    # |error| <= ~k * u * (|A| @ |B|): the float32 dot-product bound (u = 2^-24), with
    # room for the final rounding; a wrong product is off by orders of magnitude more
    assert 0 < out["worst"] <= 2.0**-23, out


GENERATE = """
    import json
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load
    from slabserve.engine.config import CacheConfig
    from slabserve.engine.embedded import ensure_model
    from slabserve.engine.generate import greedy_generate
    from slabserve.engine.runner import ModelRunner
    from slabserve import blas, env, mlxmem
    mlxmem.configure_memory(None)
    model, _ = load(str(ensure_model("tiny", "float32", cache_dir=env.cache_dir())))
    prompts = [[(7 * i + 3 * j) % 256 for j in range(n)] for i, n in enumerate((5, 23, 61))]
    ref = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=20)] for p in prompts]
    runner = ModelRunner(model, CacheConfig(block_size=16, slab_tokens=64,
                                            kv_budget_bytes=1 << 24))
    got = greedy_generate(runner, prompts, 20)
    print(json.dumps({"status": blas.status(), "ref": ref, "got": got}))
"""


@needs_openblas
def test_generation_token_exact_with_mlx_lm_under_openblas(tmp_path):
    out = _run_json(GENERATE, _child_env(tmp_path, LIB))
    assert out["status"]["blas"] == "openblas", out["status"]
    assert all(len(set(r)) > 3 for r in out["ref"]), "degenerate output weakens the check"
    assert out["got"] == out["ref"]


def _cli_info(tmp_path: Path, **extra: str) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-m", "slabserve.cli", "info", "--json"],
                       env=_child_env(tmp_path, None, **extra), capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)["blas"], p.stderr


@needs_openblas
def test_launcher_reexecs_into_openblas(tmp_path):
    st, _ = _cli_info(tmp_path)
    assert (st["blas"], st["code"]) == ("openblas", "PRELOADED")
    assert st["config"].startswith("OpenBLAS")


IN_PROCESS = """
    import json
    from slabserve import blas
    d = blas.prepare_process()
    import mlx.core as mx
    a = mx.random.normal((64, 64))
    ok = bool(mx.allclose(a @ mx.eye(64), a).item())
    print(json.dumps({"decision": d.reason.name, "status": blas.status(), "ok": ok}))
"""


@needs_openblas
def test_not_launcher_loads_openblas_in_process_before_mlx(tmp_path):
    out = _run_json(IN_PROCESS, _child_env(tmp_path, None))
    assert out["decision"] == "LOADED_GLOBAL" and out["ok"]
    assert (out["status"]["blas"], out["status"]["code"]) == ("openblas", "LOADED_GLOBAL")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher acts on Linux")
def test_launcher_without_library_or_opted_out_uses_reference(tmp_path):
    st, err = _cli_info(tmp_path, SLABSERVE_OPENBLAS=str(tmp_path / "missing.so"))
    assert (st["blas"], st["code"]) == ("reference", "NOT_FOUND")
    assert err.count("libopenblas0-pthread") == 1
    st, err = _cli_info(tmp_path, SLABSERVE_NO_OPENBLAS="1")
    assert (st["blas"], st["code"]) == ("reference", "DISABLED")
    assert "libopenblas0-pthread" not in err

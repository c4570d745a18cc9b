"""Servers started as subprocesses on loopback for ``--compare``: ours (``slabserve serve``)
with the attention selector on auto / forced native / forced gather, and ``mlx_lm.server``.

Each server gets its own random free port, its own process group (so stopping it ends its
children too) and a log file; nothing here imports MLX or the engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

ROOT = Path(__file__).resolve().parent.parent
NATIVE_ENV = "SLABSERVE_PAGED_ATTENTION_NATIVE"
# Environment variables the selector also reads; cleared so "auto" really is auto.
SELECTOR_ENVS = (NATIVE_ENV, "MLXCEL_PAGED_ATTENTION_NATIVE")


@dataclass(frozen=True)
class ServerConfig:
    """One configuration to compare.  ``native``: None = auto, True/False = forced via
    ``SLABSERVE_PAGED_ATTENTION_NATIVE`` (slabserve only)."""

    label: str
    kind: Literal["slabserve", "mlx_lm"]
    native: bool | None = None
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind == "mlx_lm" and self.native is not None:
            raise ValueError("native applies to slabserve only")


STANDARD: dict[str, ServerConfig] = {
    "auto": ServerConfig("auto", "slabserve", None),
    "native": ServerConfig("native", "slabserve", True),
    "gather": ServerConfig("gather", "slabserve", False),
    "mlx_lm": ServerConfig("mlx_lm", "mlx_lm"),
}


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_bytes_per_token(model_dir: Path) -> int:
    """K+V bytes one token takes over all layers, from the model's ``config.json``
    (``torch_dtype``, default float32)."""
    import json

    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    width = _DTYPE_BYTES.get(str(c.get("torch_dtype", "float32")), 4)
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * width


def kv_budget_bytes(model_dir: Path, tokens: int) -> int:
    """A KV budget big enough for ``tokens`` resident tokens of the model in ``model_dir``,
    plus 25% and at least 1 GiB (the server's default)."""
    return max(int(kv_bytes_per_token(model_dir) * tokens * 1.25), 1 << 30)


def kv_budget_args(model_dir: Path, tokens: int, given: tuple[str, ...]) -> tuple[str, ...]:
    """``--kv-budget`` for ``slabserve serve`` of ``kv_budget_bytes``, unless ``given`` sets
    one: mlx_lm's server has no KV limit, so ours must not be starved into preemption by the
    default.  ``--kv-memory-fraction`` in ``given`` asks for the server's own device-sized
    pool."""
    if any(a.startswith(("--kv-budget", "--kv-memory-fraction")) for a in given):
        return ()
    return ("--kv-budget", str(kv_budget_bytes(model_dir, tokens)))


def mlx_lm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlx_lm") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(cfg: ServerConfig, model_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and full environment for ``cfg`` serving ``model_dir`` on 127.0.0.1:``port``."""
    env = {k: v for k, v in os.environ.items() if k not in SELECTOR_ENVS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    common = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    if cfg.kind == "slabserve":
        argv = [sys.executable, "-m", "slabserve.cli", "serve", *common, "--log-level", "warning"]
        if cfg.native is not None:
            env[NATIVE_ENV] = "1" if cfg.native else "0"
    else:
        argv = [sys.executable, "-m", "mlx_lm", "server", *common, "--log-level", "WARNING"]
    env.update(_blas_env(env))
    env.update(dict(cfg.extra_env))
    return argv + list(cfg.extra_args), env


def _blas_env(env: dict[str, str]) -> dict[str, str]:
    """LD_PRELOAD of the OpenBLAS that the slabserve launcher would preload (slabserve.blas),
    given to every server so ours and mlx_lm.server run on the same BLAS; empty when it does
    not apply (not Linux CPU MLX, opted out, not found, already preloaded)."""
    from slabserve import blas
    from slabserve import env as ss_env

    if sys.platform != "linux" or ss_env.openblas_disabled():
        return {}
    if blas.mlx_backend() is not blas.Backend.CPU:
        return {}
    library = blas.openblas_path()
    if library is None or library in env.get("LD_PRELOAD", ""):
        return {}
    prior = env.get("LD_PRELOAD", "").strip()
    return {"LD_PRELOAD": f"{library} {prior}".strip()}


class ServerSubprocess:
    """A server subprocess on a free loopback port, in its own session (process group),
    its output in a log file: ``with Sub(...) as srv:`` starts it and waits until
    ``is_ready``; leaving the block stops it (``stop``).

    Subclasses set ``argv`` and ``env`` in ``__init__`` after calling ours, and may
    override ``is_ready`` (one readiness probe), ``poll_s``, ``tail_lines``,
    ``stop_grace_s`` and ``term_group`` (SIGTERM the whole group, or only the server
    process so that its own shutdown is what is tested).  Escalation to SIGKILL always
    ends the whole group."""

    poll_s = 0.5
    tail_lines = 30
    term_group = True
    stop_grace_s = 15.0

    def __init__(self, name: str, log_path: Path, ready_timeout_s: float) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def identity(self) -> str:
        """``pid P port N`` of the process started (empty before ``start``)."""
        return f"pid {self.proc.pid} port {self.port}" if self.proc is not None else ""

    def is_ready(self) -> bool:
        """One readiness probe: ``/health`` answers 200."""
        return httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200

    def wait_ready(self) -> None:
        """Probe until ready; raise with the log's tail if the process exits or
        ``ready_timeout_s`` passes."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            try:
                if self.is_ready():
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(self.poll_s)
        raise TimeoutError(f"{self.name} not ready in {self.ready_timeout_s}s:\n"
                           + self.log_tail())

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM (the group, or the process: ``term_group``), SIGKILL the group after
        ``grace_s`` (default ``stop_grace_s``); close the log."""
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if self.proc is not None and self.proc.poll() is None:
            if self.term_group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int | None = None) -> str:
        return "\n".join(self.log_text().splitlines()[-(n or self.tail_lines):])


class ManagedServer(ServerSubprocess):
    """A server for ``--compare``: ``with ManagedServer(cfg, model, log) as srv:
    srv.base_url``; ready when ``/health`` or (mlx_lm.server) ``/v1/models`` answers."""

    def __init__(self, cfg: ServerConfig, model_dir: Path, log_path: Path,
                 ready_timeout_s: float = 300.0) -> None:
        super().__init__(cfg.label, log_path, ready_timeout_s)
        self.cfg = cfg
        self.argv, self.env = command(cfg, model_dir, self.port)

    def is_ready(self) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(self.base_url + path, timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def model_id(self) -> str | None:
        """First id from ``/v1/models`` (None when unavailable)."""
        try:
            data = httpx.get(self.base_url + "/v1/models", timeout=5.0).json()
            return data["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None

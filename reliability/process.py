"""``slabserve serve`` as a subprocess on a random loopback port, observed from outside:
readiness through ``/health``, resident memory through ``/proc/PID/status``, exit status
after SIGTERM.

The server runs in its own session (process group), so a stop that has to escalate to
SIGKILL ends every process it started.  ``ServerOptions`` is the one place that knows the
server's flag names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from slabserve.loadtest.servers import ROOT, ServerSubprocess


@dataclass(frozen=True)
class ServerOptions:
    """What the reliability runs vary.  ``model`` None = the embedded tiny model.
    ``kv_budget_bytes`` and ``slab_tokens`` small enough force preemption;
    ``max_queued`` is the admission queue limit (429 beyond it).  ``cache_limit_bytes``
    bounds MLX's buffer cache, which otherwise keeps freed buffers up to a quarter of RAM
    and so makes resident memory grow by design (see docs/reliability.md)."""

    model: str | None = None
    max_context: int = 512
    kv_budget_bytes: int = 1 << 20
    slab_tokens: int = 512
    max_running: int = 16
    max_queued: int = 32
    shutdown_timeout_s: float = 10.0
    max_body_bytes: int = 256 << 10
    cache_limit_bytes: int | None = 64 << 20  # MLX buffer cache; None = server default
    log_level: str = "warning"
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_context < 32:
            raise ValueError("max_context must be at least 32 for the traffic mix")
        if self.kv_budget_bytes <= 0 or self.slab_tokens <= 0:
            raise ValueError("kv_budget_bytes and slab_tokens must be positive")
        if self.max_running < 1 or self.max_queued < 0 or self.shutdown_timeout_s < 0:
            raise ValueError("max_running >= 1, max_queued >= 0, shutdown_timeout_s >= 0")

    def argv(self) -> list[str]:
        """The ``slabserve serve`` flags for these options (host and port excepted)."""
        args = ["--max-context", str(self.max_context),
                "--kv-budget", str(self.kv_budget_bytes),
                "--slab-tokens", str(self.slab_tokens),
                "--max-running", str(self.max_running),
                "--max-queued", str(self.max_queued),
                "--shutdown-timeout", str(self.shutdown_timeout_s),
                "--max-body-bytes", str(self.max_body_bytes),
                "--log-level", self.log_level]
        if self.model is not None:
            args += ["--model", self.model]
        if self.cache_limit_bytes is not None:
            args += ["--cache-limit", str(self.cache_limit_bytes)]
        return args + list(self.extra_args)


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes (None when the process is gone or /proc is missing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess(ServerSubprocess):
    """``with ServerProcess(opts, log_path) as srv:`` a ready server at ``srv.url``.

    ``terminate()`` sends SIGTERM and waits for the exit status; leaving the block stops
    the server if it still runs (SIGTERM to the server process only, so its own drain is
    what runs, then SIGKILL of its group after ``stop_grace_s``).
    """

    poll_s = 0.2
    tail_lines = 40
    term_group = False
    stop_grace_s = 20.0

    def __init__(self, opts: ServerOptions, log_path: Path, ready_timeout_s: float = 180.0,
                 env: dict[str, str] | None = None) -> None:
        super().__init__("server", log_path, ready_timeout_s)
        self.opts = opts
        self.url = self.base_url
        self.argv = [sys.executable, "-m", "slabserve.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), *opts.argv()]
        self.env = dict(os.environ if env is None else env)
        path = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def is_ready(self) -> bool:
        """``/health`` answers 200 and does not say ``ready: false``."""
        r = httpx.get(self.url + "/health", timeout=2.0)
        return r.status_code == 200 and r.json().get("ready", True)

    def rss_bytes(self) -> int | None:
        return read_rss_bytes(self.pid)

    def send_sigterm(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status, or None if still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM the server process; its exit status, or None if it is still running
        after ``timeout_s`` (then it is left running for ``stop`` to kill)."""
        self.send_sigterm()
        return self.wait_exit(timeout_s)

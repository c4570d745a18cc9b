"""Helpers for the tensor-parallel tests: ``slabserve serve`` under
``mlx.launch -n 2 --backend ring`` on loopback (or alone, for reference), its output in a
file, and the ranks' pids read from /proc (Linux)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_base() -> int:
    """A port p with p and p + 1 free (the ring's rank 0 and rank 1 listen there)."""
    for _ in range(100):
        p = free_port()
        if p < 65000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no two adjacent free ports")


class Server:
    """``slabserve serve --model MODEL FLAGS`` on a free port: under ``mlx.launch`` with
    ``ranks`` > 1, else one plain process.  Output goes to a temporary file (``output()``);
    stdin is a pipe nobody writes (the launcher forwards its stdin; a closed one would spin
    it)."""

    def __init__(self, model: Path, *flags: str, ranks: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = [sys.executable, "-m", "slabserve.cli", "serve", "--model", str(model),
                 "--port", str(self.port), "--log-level", "info", *flags]
        cmd = serve if ranks == 1 else [
            str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--starting-port",
            str(ring_base()), "--", *serve]
        self.log = tempfile.NamedTemporaryFile(prefix="slabserve-dist-", suffix=".log")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ranks = ranks

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not come up:\n" + self.output())

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of the launcher's children (their MLX_RANK)."""
        if self.ranks == 1:
            return {0: self.proc.pid}
        out = {}
        for pid in _children(self.proc.pid):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"MLX_RANK=")]
            if rank:
                out[int(rank[0].split(b"=")[1])] = pid
        return out

    def wait_output(self, text: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (out := self.output()):
            assert time.monotonic() < deadline, f"{text!r} never appeared:\n{out}"
            time.sleep(0.2)
        return out

    def close(self, pids: dict[int, int] | None = None) -> None:
        """End the launcher and any rank left (only these processes, by pid)."""
        for pid in (pids or {}).values():
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _children(ppid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.2)

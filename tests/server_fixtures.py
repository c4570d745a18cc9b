"""Helpers for the server tests: a real uvicorn server on a loopback port, in a thread of
this process, around an app built by ``server.app.create_app``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from slabserve.build import ServeConfig, build_serving
from slabserve.engine.config import CacheConfig
from slabserve.scheduler.config import SchedulerConfig
from slabserve.server.app import create_app
from slabserve.server.config import ServerConfig


def tiny_engine(**scheduler: object):
    """The embedded tiny model with a small KV budget (scheduler limits overridable).

    A fresh runner (and selector) per call: the native CPU path keeps the MLX streams of
    the first thread that used it, and MLX streams belong to one thread, so reusing one
    across serving threads would fail ("There is no Stream(cpu, N) in
    current thread").  Each build has its own runner and selector."""
    cfg = ServeConfig(model=None, cache=CacheConfig(slab_tokens=1024, kv_budget_bytes=64 << 20),
                       scheduler=SchedulerConfig(**scheduler))
    return build_serving(cfg)


class LiveServer:
    """``with LiveServer(app) as srv:`` serves ``app`` on 127.0.0.1:``srv.port`` until the
    block ends (then a graceful stop: lifespan shutdown drains the serving)."""

    def __init__(self, app, startup_timeout: float = 60.0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.startup_timeout = startup_timeout

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the server's event loop (where the serving loop lives); its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    @property
    def ctx(self):
        return self.app.state.ctx


def serve(serving, **server: object) -> LiveServer:
    return LiveServer(create_app(serving, ServerConfig(**server)))

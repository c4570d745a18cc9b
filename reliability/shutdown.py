"""SIGTERM under load: open long streams (and a few non-streaming requests), wait until
every stream has sent its first chunk, SIGTERM the server, and record how each ended.

A stream ends properly with a final chunk carrying a ``finish_reason`` then ``[DONE]``,
or with a clear error event; a non-streaming request ends with a complete 200 answer or
an error object (503 ``shutting_down``).  A connection cut without either is ``cut``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from slabserve.loadtest.sse import parse_line, sse_lines
from slabserve.reliability.process import ServerProcess
from slabserve.reliability.traffic import limits


@dataclass(frozen=True)
class StreamEnd:
    """How one in-flight request ended: ``final`` (finish_reason chunk and [DONE]),
    ``error_event``, ``complete`` / ``error_status`` (non-streaming) or ``cut``."""

    kind: str
    how: str
    finish_reason: str | None = None
    status: int | None = None
    detail: str = ""


@dataclass
class ShutdownResult:
    ends: list[StreamEnd] = field(default_factory=list)
    late_status: int | None = None  # a request sent after SIGTERM (None: not connected)
    exit_code: int | None = None
    exit_after_s: float = 0.0

    @property
    def cut(self) -> list[StreamEnd]:
        return [e for e in self.ends if e.how == "cut"]


async def _stream(client: httpx.AsyncClient, url: str, body: dict,
                  first: asyncio.Event) -> StreamEnd:
    finish, done, error = None, False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                first.set()
                await r.aread()
                return StreamEnd("stream", "error_status", None, r.status_code, r.text[:200])
            async for line in sse_lines(r):
                chunk = parse_line(line)
                if chunk is None:
                    continue
                first.set()
                done = done or chunk.done
                if chunk.error_json is not None:
                    error = chunk.error_json[:200]
                for _, reason in chunk.finishes:
                    finish = reason
    except (httpx.HTTPError, ValueError) as e:
        return StreamEnd("stream", "cut", finish, 200, f"{type(e).__name__}: {e}")
    finally:
        first.set()
    if error is not None:
        return StreamEnd("stream", "error_event", finish, 200, error)
    if finish is not None and done:
        return StreamEnd("stream", "final", finish, 200)
    return StreamEnd("stream", "cut", finish, 200, f"done={done}")


async def _plain(client: httpx.AsyncClient, url: str, body: dict) -> StreamEnd:
    try:
        r = await client.post(url + "/v1/completions", json=body)
    except httpx.HTTPError as e:
        return StreamEnd("plain", "cut", None, None, f"{type(e).__name__}: {e}")
    try:
        obj = r.json()
    except ValueError:
        return StreamEnd("plain", "cut", None, r.status_code, r.text[:200])
    if r.status_code == 200 and obj.get("choices"):
        return StreamEnd("plain", "complete", obj["choices"][0].get("finish_reason"), 200)
    if "error" in obj:
        return StreamEnd("plain", "error_status", None, r.status_code, json.dumps(obj)[:200])
    return StreamEnd("plain", "cut", None, r.status_code, r.text[:200])


async def _late(client: httpx.AsyncClient, url: str, body: dict) -> int | None:
    """A new request shortly after the signal: its status (503 while draining), or None
    when the server no longer accepts connections."""
    await asyncio.sleep(0.2)
    try:
        r = await client.post(url + "/v1/completions", json={**body, "max_tokens": 1})
    except httpx.HTTPError:
        return None
    return r.status_code


async def sigterm_under_load(srv: ServerProcess, streams: int = 6, plain: int = 2,
                             max_tokens: int = 400, exit_timeout_s: float = 60.0
                             ) -> ShutdownResult:
    """Run the scenario against ``srv`` (which it terminates).  ``max_tokens`` should be
    long enough that the requests are still running when the signal arrives."""
    async with httpx.AsyncClient(timeout=exit_timeout_s + 30,
                                 limits=limits(streams + plain + 4)) as client:
        model = (await client.get(srv.url + "/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": "shutdown " * 4, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        firsts = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.ensure_future(_stream(client, srv.url, {**body, "stream": True}, ev))
                 for ev in firsts]
        tasks += [asyncio.ensure_future(_plain(client, srv.url, body)) for _ in range(plain)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in firsts)), 120.0)
        res = ShutdownResult()
        t0 = time.perf_counter()
        srv.send_sigterm()
        res.late_status = await _late(client, srv.url, body)
        res.exit_code = await asyncio.to_thread(srv.wait_exit, exit_timeout_s)
        res.exit_after_s = time.perf_counter() - t0
        res.ends = list(await asyncio.gather(*tasks))
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m slabserve.reliability.shutdown``: SIGTERM a server with long streams in
    flight and print how each request ended; exit 1 if one was cut or the exit status was not 0."""
    import argparse
    import tempfile
    from pathlib import Path

    from slabserve.reliability.process import ServerOptions

    p = argparse.ArgumentParser(prog="python -m slabserve.reliability.shutdown")
    p.add_argument("--shutdown-timeout", type=float, default=2.0)
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--plain", type=int, default=2)
    a = p.parse_args(argv)
    opts = ServerOptions(max_context=512, kv_budget_bytes=8 << 20,
                         shutdown_timeout_s=a.shutdown_timeout)
    log = Path(tempfile.mkdtemp(prefix="shutdown-")) / "slabserve.server.log"
    with ServerProcess(opts, log) as srv:
        res = asyncio.run(sigterm_under_load(srv, a.streams, a.plain, max_tokens=400,
                                             exit_timeout_s=a.shutdown_timeout + 20))
    for e in res.ends:
        print(f"{e.kind:6} {e.how:12} finish_reason={e.finish_reason} status={e.status}")
    print(f"request after SIGTERM: {res.late_status}; exit status {res.exit_code} "
          f"after {res.exit_after_s:.1f} s")
    return 0 if res.exit_code == 0 and not res.cut else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Overload: many simultaneous requests against a small admission queue.

The excess must be refused at once with 429 and a ``Retry-After`` header while every
admitted request is served to its end; a refused client that waits ``Retry-After`` and
tries again is eventually served, so with retries nothing is lost.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from slabserve.reliability.traffic import Outcome, Target, generate, limits, words


@dataclass
class OverloadResult:
    """First-attempt outcomes, and per request the attempts it took to be served."""

    first: list[Outcome] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    final: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def admitted(self) -> list[Outcome]:
        return [o for o in self.first if o.status == 200]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.first if o.status == 429]

    def latency_quantiles(self) -> dict[str, float]:
        """Latency of the admitted first attempts: p50, p90, p99, max (seconds)."""
        xs = sorted(o.latency_s for o in self.admitted)
        if not xs:
            return {}
        q = {f"p{p}": xs[min(len(xs) - 1, int(len(xs) * p / 100))] for p in (50, 90, 99)}
        return {**{k: round(v, 3) for k, v in q.items()}, "max": round(xs[-1], 3)}

    def summary(self) -> dict:
        refused = self.refused
        return {
            "requests": len(self.first), "admitted": len(self.admitted),
            "refused_429": len(refused),
            "retry_after": sorted({o.retry_after for o in refused}, key=str),
            "other": sorted(o.status for o in self.first if o.status not in (200, 429)
                            and o.status is not None),
            "admitted_latency_s": self.latency_quantiles(),
            "max_attempts": max(self.attempts, default=0),
            "served_in_the_end": sum(1 for o in self.final if o.result == "completed"),
            "final_failures": [f"{o.status}: {o.detail}"[:160] for o in self.final
                               if o.result != "completed"][:5],
            "wall_s": round(self.wall_s, 1),
        }


def _body(t: Target, rng: random.Random, max_tokens: int) -> dict:
    return {"model": t.model, "prompt": words(rng, rng.randint(2, 12)),
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": rng.random() < 0.5}


async def _one(client: httpx.AsyncClient, t: Target, i: int, max_tokens: int,
               retries: int, start: asyncio.Event, res: OverloadResult) -> None:
    rng = random.Random(i)
    body = _body(t, rng, max_tokens)
    await start.wait()
    out = await generate(client, t, "overload", "/v1/completions", body)
    res.first[i] = out
    attempts = 1
    while out.status == 429 and attempts <= retries:
        await asyncio.sleep(float(out.retry_after or 1) + rng.random() * 0.5)
        out = await generate(client, t, "overload_retry", "/v1/completions", body)
        attempts += 1
    res.attempts[i] = attempts
    res.final[i] = out


BURST = 48  # more than the soak server's queue limit (32) can hold at once


async def burst(client: httpx.AsyncClient, t: Target, rng: random.Random) -> Outcome:
    """A load spike inside the soak: ``BURST`` short completions at once.  Fine when each
    is served or refused with 429 + ``Retry-After``; the outcome sums them up."""
    bodies = [_body(t, rng, rng.randint(1, 8)) for _ in range(BURST)]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(generate(client, t, "burst", "/v1/completions", b)
                                  for b in bodies))
    served = sum(1 for o in outs if o.result == "completed")
    refused = sum(1 for o in outs if o.result == "refused" and o.retry_after is not None)
    bad = [o for o in outs if o.result not in ("completed", "refused")
           or (o.result == "refused" and o.retry_after is None)]
    detail = f"{served} served, {refused} refused with Retry-After"
    if bad:
        return Outcome("burst", True, "failed", bad[0].status, f"{detail}; {bad[0].detail}")
    return Outcome("burst", True, "completed", 200, detail, time.perf_counter() - t0)


async def overload(url: str, requests: int = 200, max_tokens: int = 16,
                   retries: int = 0, timeout_s: float = 300.0) -> OverloadResult:
    """Fire ``requests`` completions at once (half streaming); with ``retries`` > 0 a
    refused one waits ``Retry-After`` (plus jitter) and tries again up to that often."""
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits(requests + 8)) as client:
        card = (await client.get(url + "/v1/models")).json()["data"][0]
        t = Target(url, card["id"], int(card.get("max_model_len") or 2048))
        res = OverloadResult([None] * requests, [0] * requests, [None] * requests)
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(_one(client, t, i, max_tokens, retries, start, res))
                 for i in range(requests)]
        await asyncio.sleep(0.2)  # every task is waiting on the start line
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        res.wall_s = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m slabserve.reliability.overload``: start a server (queue limit 32), fire 200
    requests at once, print the summary; exit 1 if the overload contract broke."""
    import argparse
    import json
    import tempfile
    from pathlib import Path

    from slabserve.reliability.process import ServerOptions, ServerProcess

    p = argparse.ArgumentParser(prog="python -m slabserve.reliability.overload")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-queued", type=int, default=32)
    p.add_argument("--max-running", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--retries", type=int, default=30)
    a = p.parse_args(argv)
    opts = ServerOptions(max_context=256, kv_budget_bytes=8 << 20, max_running=a.max_running,
                         max_queued=a.max_queued)
    log = Path(tempfile.mkdtemp(prefix="overload-")) / "slabserve.server.log"
    with ServerProcess(opts, log) as srv:
        res = asyncio.run(overload(srv.url, a.requests, a.max_tokens, a.retries))
    s = res.summary()
    print(json.dumps(s, indent=1))
    ok = (s["refused_429"] > 0 and not s["other"] and not s["final_failures"]
          and all(o.retry_after is not None for o in res.refused))
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Soak: drive a real ``slabserve serve`` on loopback with mixed traffic for a while, then
check that nothing was lost or leaked (see ``reliability.report`` for the invariants).

    python -m slabserve.reliability.soak --minutes 10
    python -m slabserve.reliability.soak --seconds 40 --concurrency 6 --json soak.json

The server is started as a subprocess with a KV budget small enough to force
preemption and a short context so prompts near the limit are cheap; ``--server-arg``
passes more flags through.  Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from slabserve.reliability import badinput, overload, traffic
from slabserve.reliability.observe import parse_metrics, wait_idle
from slabserve.reliability.process import ServerOptions, ServerProcess
from slabserve.reliability.report import MIB, SoakReport
from slabserve.reliability.traffic import Outcome, Scenario, Target

MIX: tuple[tuple[Scenario, float], ...] = (
    (traffic.chat, 25), (traffic.completion, 25), (traffic.near_limit, 10),
    (traffic.disconnect_stream, 10), (traffic.disconnect_wait, 5), (badinput.invalid, 25),
    (badinput.partial_body, 3), (overload.burst, 1),
)
LOG_PROBLEMS = re.compile(r"Traceback|internal error|step \d+ failed|Exception in ASGI")


@dataclass(frozen=True)
class SoakConfig:
    """``duration_s`` of measured traffic after ``warmup_s`` of the same traffic (memory
    is measured from the end of warm-up).  ``request_timeout_s``: a request taking longer
    counts as a hang (failed)."""

    duration_s: float = 40.0
    warmup_s: float = 5.0
    concurrency: int = 6
    seed: int = 0
    request_timeout_s: float = 120.0
    idle_timeout_s: float = 30.0
    rss_growth_limit_bytes: int = 128 * MIB
    shutdown_wait_s: float = 60.0
    exclude: tuple[str, ...] = ()  # scenario names left out of the mix

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.concurrency < 1:
            raise ValueError("duration_s > 0, warmup_s >= 0 and concurrency >= 1 required")
        unknown = set(self.exclude) - {s.__name__ for s, _ in MIX}
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}")

    def mix(self) -> tuple[tuple[Scenario, float], ...]:
        return tuple((s, w) for s, w in MIX if s.__name__ not in self.exclude)


async def discover(client: httpx.AsyncClient, url: str, max_body_bytes: int) -> Target:
    """Model id and context limit from ``/v1/models``."""
    card = (await client.get(url + "/v1/models")).json()["data"][0]
    return Target(url, card["id"], int(card.get("max_model_len") or 2048), max_body_bytes)


def pick(rng: random.Random, mix: tuple[tuple[Scenario, float], ...] = MIX) -> Scenario:
    return rng.choices([s for s, _ in mix], weights=[w for _, w in mix])[0]


async def _guarded(scenario: Scenario, client: httpx.AsyncClient, t: Target,
                   rng: random.Random, timeout_s: float) -> Outcome:
    try:
        return await asyncio.wait_for(scenario(client, t, rng), timeout_s)
    except asyncio.TimeoutError:
        name = getattr(scenario, "__name__", "scenario")
        return Outcome(name, True, "failed", None, f"no answer in {timeout_s}s (hang)")


async def drive(client: httpx.AsyncClient, t: Target, seconds: float, cfg: SoakConfig,
                seed: int) -> list[Outcome]:
    """``cfg.concurrency`` closed-loop clients sending the mix for ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    out: list[Outcome] = []
    mix = cfg.mix()

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        while loop.time() < deadline:
            out.append(await _guarded(pick(rng, mix), client, t, rng, cfg.request_timeout_s))

    await asyncio.gather(*(worker(i) for i in range(cfg.concurrency)))
    return out


async def sample_rss(srv: ServerProcess, report: SoakReport, stop: asyncio.Event) -> None:
    """Every second until ``stop``: the server's RSS into the peak and the timeline."""
    t0 = time.monotonic()
    while not stop.is_set():
        rss = srv.rss_bytes()
        if rss is not None:
            report.rss_peak = max(report.rss_peak or 0, rss)
            report.rss_samples.append((time.monotonic() - t0, rss))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def canary(client: httpx.AsyncClient, t: Target) -> Outcome:
    """One request after the run: completes only if the engine loop is still alive."""
    body = {"model": t.model, "prompt": "after the soak", "max_tokens": 4, "temperature": 0}
    try:
        return await asyncio.wait_for(
            traffic.generate(client, t, "canary", "/v1/completions", body), 60.0)
    except asyncio.TimeoutError:
        return Outcome("canary", True, "failed", None, "no answer in 60 s: engine dead?")


async def run_traffic(srv: ServerProcess, cfg: SoakConfig, report: SoakReport) -> None:
    """Warm-up, measured traffic, then the after-run state, canary and memory."""
    pool = traffic.limits(cfg.concurrency * (overload.BURST + 2))
    async with httpx.AsyncClient(timeout=cfg.request_timeout_s, limits=pool) as client:
        t = await discover(client, srv.url, srv.opts.max_body_bytes)
        report.outcomes += await drive(client, t, cfg.warmup_s, cfg, cfg.seed + 1)
        await wait_idle(client, srv.url, cfg.idle_timeout_s)
        report.rss_before = report.rss_peak = srv.rss_bytes()
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(srv, report, stop))
        report.outcomes += await drive(client, t, cfg.duration_s, cfg, cfg.seed)
        stop.set()
        await sampler
        report.state_after = await wait_idle(client, srv.url, cfg.idle_timeout_s)
        report.canary = await canary(client, t)
        report.state_after = await wait_idle(client, srv.url, cfg.idle_timeout_s)
        report.rss_after = srv.rss_bytes()
        metrics = parse_metrics((await client.get(srv.url + "/metrics")).text)
        report.server_counters = {k: v for k, v in metrics.items()
                                  if "request_success" in k or "request_errors" in k}


def run(opts: ServerOptions, cfg: SoakConfig, log_path: Path) -> SoakReport:
    """Start the server, soak it, SIGTERM it; the report (check ``violations()``)."""
    report = SoakReport(cfg.duration_s, cfg.warmup_s, cfg.concurrency, opts.argv(),
                        rss_growth_limit=cfg.rss_growth_limit_bytes,
                        excluded=list(cfg.exclude))
    with ServerProcess(opts, log_path) as srv:
        try:
            asyncio.run(run_traffic(srv, cfg, report))
        finally:
            report.exit_code = srv.terminate(cfg.shutdown_wait_s)
        log = srv.log_text()
    report.log_problems = [f"server log: {line.strip()[:200]}" for line in log.splitlines()
                           if LOG_PROBLEMS.search(line)][:10]
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m slabserve.reliability.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float)
    g.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up traffic")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="server --model (default: embedded tiny)")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--kv-budget-mib", type=float, default=1.0)
    p.add_argument("--slab-tokens", type=int, default=512)
    p.add_argument("--cache-limit-mib", type=float, default=64.0,
                   help="server --cache-limit (MLX buffer cache); negative = server default")
    p.add_argument("--rss-growth-mib", type=float, default=128.0,
                   help="allowed RSS growth after warm-up")
    p.add_argument("--exclude", action="append", default=[],
                   help="leave a scenario out of the mix (repeatable): "
                   + ", ".join(s.__name__ for s, _ in MIX))
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for slabserve serve (repeatable)")
    p.add_argument("--log", type=Path, default=None, help="server log file")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    seconds = a.minutes * 60 if a.minutes is not None else a.seconds
    opts = ServerOptions(model=a.model, max_context=a.max_context,
                         kv_budget_bytes=int(a.kv_budget_mib * MIB), slab_tokens=a.slab_tokens,
                         cache_limit_bytes=None if a.cache_limit_mib < 0
                         else int(a.cache_limit_mib * MIB),
                         extra_args=tuple(a.server_arg))
    cfg = SoakConfig(duration_s=seconds, warmup_s=a.warmup, concurrency=a.concurrency,
                     seed=a.seed, rss_growth_limit_bytes=int(a.rss_growth_mib * MIB),
                     exclude=tuple(a.exclude))
    log = a.log or Path(tempfile.mkdtemp(prefix="soak-")) / "slabserve.server.log"
    report = run(opts, cfg, log)
    print(report.to_markdown() if a.markdown else report.to_json())
    if a.json is not None:
        a.json.write_text(report.to_json())
    print(f"server log: {log}", file=sys.stderr)
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())

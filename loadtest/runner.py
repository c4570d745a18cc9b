"""Closed-loop load: ``concurrency`` workers each send one request at a time.

A run is bounded twice: by ``requests`` (total measured requests) and by ``duration_s``
(no new request starts after it; those in flight finish, each bounded by ``timeout_s``).
Warm-up requests run first at the same concurrency and are discarded, as are their metrics
deltas: the server-trace snapshot is taken after warm-up.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from slabserve.loadtest.client import Endpoint, send_one
from slabserve.loadtest.metrics import RequestRecord, RunSummary, summarize
from slabserve.loadtest.traces import (
    PHASE_SUM,
    PathTrace,
    counter_deltas,
    histogram_delta,
    histogram_quantile,
    labelled_deltas,
    path_delta,
    snapshot,
)


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a context length, a concurrency, and the bounds."""

    context: int
    concurrency: int
    max_tokens: int
    requests: int
    duration_s: float = 120.0
    warmup: int = 1
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, requests and max_tokens must be >= 1")
        if self.context <= self.max_tokens:
            raise ValueError("context must exceed max_tokens (prompt = context - max_tokens)")
        if self.warmup < 0 or self.duration_s <= 0:
            raise ValueError("warmup >= 0 and duration_s > 0 required")

    @property
    def prompt_tokens(self) -> int:
        """Prompt length so that prompt + output ends exactly at ``context``."""
        return self.context - self.max_tokens


@dataclass(frozen=True)
class RunResult:
    label: str
    spec: RunSpec
    summary: RunSummary
    trace: PathTrace | None
    records: tuple[RequestRecord, ...]
    server_counters: dict[str, float] = field(default_factory=dict)
    round: int = 0  # --compare --rounds: which pass over the configurations (0-based)
    server: str = ""  # --compare: the server process that served it ("pid P port N")
    host_probe_ms: float | None = None  # the host's speed just before it (hostprobe.py)


class _Progress:
    """tqdm bar on stderr when available and wanted, else silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr,
                                leave=False, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, failed: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if failed:
                self.bar.set_postfix_str("failures!")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _drive(client: httpx.AsyncClient, ep: Endpoint, prompts: Sequence[str],
                 spec: RunSpec, deadline: float, progress: _Progress) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    next_index = iter(range(len(prompts)))

    async def worker() -> None:
        for i in next_index:
            if time.perf_counter() >= deadline:
                return
            rec = await send_one(client, ep, prompts[i], spec.max_tokens)
            records.append(rec)
            progress.update(not rec.ok)

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return records


async def run_once(ep: Endpoint, spec: RunSpec, prompts: Sequence[str], label: str = "",
                   show_progress: bool = True,
                   transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Warm up with ``prompts[:spec.warmup]``, then measure over the rest (at most
    ``spec.requests`` of them).  ``transport`` replaces the network (tests)."""
    if len(prompts) < spec.warmup + 1:
        raise ValueError("need at least warmup + 1 prompts")
    limits = httpx.Limits(max_connections=spec.concurrency + 2)
    timeout = httpx.Timeout(spec.timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        warm = prompts[: spec.warmup]
        if warm:
            far = time.perf_counter() + spec.timeout_s
            await _drive(client, ep, warm, spec, far, _Progress(0, "", False))
        measured = prompts[spec.warmup: spec.warmup + spec.requests]
        before = await snapshot(client, ep.base_url, ep.metrics_path)
        desc = f"{label} ctx={spec.context} c={spec.concurrency}"
        bar = _Progress(len(measured), desc, show_progress)
        try:
            deadline = time.perf_counter() + spec.duration_s
            records = await _drive(client, ep, measured, spec, deadline, bar)
        finally:
            bar.close()
        after = await snapshot(client, ep.base_url, ep.metrics_path)
    both = before is not None and after is not None
    trace = path_delta(before, after) if both else None
    counters = counter_deltas(before, after) if both else {}
    for phase, total in (labelled_deltas(before, after, PHASE_SUM, "phase") if both
                         else {}).items():
        counters[f"decode_{phase}_seconds_sum"] = total
    p50 = histogram_quantile(0.5, histogram_delta(before, after)) if both else None
    if p50 is not None:  # the server's median decode step (its histogram, our servers)
        counters["decode_step_p50_seconds"] = p50
    summary = summarize(records, expected_output_tokens=spec.max_tokens)
    return RunResult(label, spec, summary, trace, tuple(records), counters)

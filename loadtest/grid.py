"""A grid of runs (contexts x concurrency levels) against one endpoint, and ``--compare``
over several launched servers with the very same prompts."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from slabserve.loadtest.client import Endpoint
from slabserve.loadtest.hostprobe import host_probe_ms
from slabserve.loadtest.prompts import Tokenizer, make_prompt
from slabserve.loadtest.runner import RunResult, RunSpec, run_once
from slabserve.loadtest.servers import ManagedServer, ServerConfig


@dataclass(frozen=True)
class GridSpec:
    """Contexts x concurrency levels.  ``requests``: measured requests per run, one number
    for every run or one per concurrency level (None: max(4, 2 x concurrency)).
    ``warmup``: warm-up requests per run (None: the run's concurrency, one concurrent
    round, so batched shapes are compiled before measuring, for every server alike).
    ``length_spread``: 0 = every prompt fills its context exactly; F in (0, 1) = prompt
    lengths drawn uniformly from [(1 - F) x, x] of that (seeded per prompt, the same for
    every configuration), as real traffic has, so prefill shapes do not all repeat."""

    contexts: tuple[int, ...]
    concurrency: tuple[int, ...]
    max_tokens: int
    requests: tuple[int, ...] | None = None
    duration_s: float = 120.0
    warmup: int | None = None
    timeout_s: float = 600.0
    seed: int = 0
    length_spread: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.length_spread < 1.0:
            raise ValueError("length_spread must be in [0, 1)")
        if self.requests is not None and len(self.requests) not in (1, len(self.concurrency)):
            raise ValueError("requests: one number, or one per concurrency level")

    def requests_for(self, i: int) -> int:
        """Measured requests at the ``i``-th concurrency level."""
        if self.requests is None:
            return max(4, 2 * self.concurrency[i])
        return self.requests[i if len(self.requests) > 1 else 0]

    def specs(self) -> list[RunSpec]:
        return [RunSpec(ctx, c, self.max_tokens, self.requests_for(i), self.duration_s,
                        c if self.warmup is None else self.warmup, self.timeout_s)
                for ctx in self.contexts for i, c in enumerate(self.concurrency)]


def build_prompts(grid: GridSpec, tok: Tokenizer) -> dict[tuple[int, int], list[str]]:
    """(context, concurrency) -> warm-up + measured prompts.  Indices run on across the whole
    grid, so no prompt repeats within one server's lifetime (no prompt-cache hits), and every
    configuration gets the same prompts."""
    out: dict[tuple[int, int], list[str]] = {}
    index = 0
    for spec in grid.specs():
        n = spec.warmup + spec.requests
        out[(spec.context, spec.concurrency)] = [
            make_prompt(tok, prompt_length(grid, spec.prompt_tokens, index + i), index + i,
                        grid.seed) for i in range(n)]
        index += n
    return out


def prompt_length(grid: GridSpec, full: int, index: int) -> int:
    """Tokens of prompt ``index`` in a cell whose prompts fill ``full`` tokens."""
    if not grid.length_spread:
        return full
    u = random.Random(grid.seed * 7_919 + index).random()
    return max(1, round(full * (1.0 - grid.length_spread * u)))


class Stopped(Exception):
    """The load was interrupted (Ctrl-C, or SIGTERM from ``timeout``): ``results`` are the
    runs that finished before it, ``skipped`` the configurations skipped so far.  The run in
    flight is lost; its server is stopped on the way out."""

    def __init__(self, results: Sequence[RunResult], skipped: dict[str, str] | None = None):
        super().__init__(f"stopped after {len(results)} finished runs")
        self.results = list(results)
        self.skipped = dict(skipped or {})


def run_grid(ep: Endpoint, grid: GridSpec, prompts: dict[tuple[int, int], list[str]],
             label: str, show_progress: bool = True) -> list[RunResult]:
    """Every cell of ``grid`` against ``ep``, smallest context first, each run carrying the
    host's speed just before it (``host_probe_ms``); interrupted, it raises ``Stopped``
    with the runs so far."""
    results = []
    try:
        for spec in grid.specs():
            probe = host_probe_ms()
            res = asyncio.run(run_once(ep, spec, prompts[(spec.context, spec.concurrency)],
                                       label, show_progress))
            res = replace(res, host_probe_ms=probe)
            results.append(res)
            print_run(res)
    except KeyboardInterrupt:
        raise Stopped(results) from None
    return results


def print_run(res: RunResult, tag: str = "") -> None:
    """One line on stderr: the run's counts, tok/s, TTFT/TPOT p50 and server paths."""
    s, spec = res.summary, res.spec
    print(f"[{res.label}]{tag} ctx={spec.context} conc={spec.concurrency}: "
          f"{s.requests_ok} ok, {s.requests_failed} failed, "
          f"{s.output_tok_s:.2f} out tok/s, TTFT p50 {s.ttft.p50:.0f} ms, "
          f"TPOT p50 {s.tpot.p50:.1f} ms, paths "
          f"{res.trace.describe() if res.trace else 'n/a'}", file=sys.stderr)


def endpoint_for(srv: ManagedServer, eos_ids: tuple[int, ...]) -> Endpoint:
    """Ours: ``ignore_eos`` and the served model id.  mlx_lm.server: EOS suppressed with
    ``logit_bias`` (it has no ``ignore_eos``), no ``model`` field (it would load that path),
    no ``/metrics``."""
    if srv.cfg.kind == "mlx_lm":
        mode = "logit_bias" if eos_ids else "none"
        return Endpoint(srv.base_url, None, mode, eos_ids, metrics_path=None)
    return Endpoint(srv.base_url, srv.model_id(), "ignore_eos", eos_ids)


def run_compare(configs: Sequence[ServerConfig], model_dir: Path, grid: GridSpec,
                prompts: dict[tuple[int, int], list[str]], eos_ids: tuple[int, ...],
                log_dir: Path, ready_timeout_s: float = 300.0,
                show_progress: bool = True,
                rounds: int = 1) -> tuple[list[RunResult], dict[str, str]]:
    """Start each configuration in turn on loopback, run the grid, stop it; with
    ``rounds`` > 1 the whole pass repeats (configurations interleaved, so a machine that
    drifts over minutes drifts for all of them alike) and each result carries its round.
    A server that fails to start is skipped (label -> reason in the second value) for the
    rest of the comparison; the others still run."""
    def run(srv: ManagedServer, rnd: int, results: list) -> None:
        _tagged_grid(srv, rnd, srv.cfg.label, grid, prompts, eos_ids, show_progress, results)

    return on_each_server(configs, model_dir, log_dir, ready_timeout_s, run, rounds)


def on_each_server(configs: Sequence[ServerConfig], model_dir: Path, log_dir: Path,
                   ready_timeout_s: float, run, rounds: int = 1) -> tuple[list, dict[str, str]]:
    """Each configuration on its own loopback server in turn: start it, ``run(srv, round,
    results)`` (which appends to ``results``, also what an interrupted run finished), stop
    it; ``rounds`` passes, configurations interleaved.  A server that fails to start is
    skipped for the rest (label -> reason in the second value); interrupted: ``Stopped``
    with what finished."""
    results: list = []
    skipped: dict[str, str] = {}
    try:
        for rnd in range(rounds):
            for cfg in configs:
                if cfg.label in skipped:
                    continue
                tag = f" round {rnd + 1}/{rounds}" if rounds > 1 else ""
                log = log_dir / (f"server-{cfg.label}-r{rnd + 1}.log" if rounds > 1
                                 else f"server-{cfg.label}.log")
                print(f"[{cfg.label}] starting {cfg.kind}{tag} ...", file=sys.stderr)
                try:
                    with ManagedServer(cfg, model_dir, log, ready_timeout_s) as srv:
                        run(srv, rnd, results)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"[{cfg.label}] could not start: {exc}", file=sys.stderr)
                    skipped[cfg.label] = str(exc).splitlines()[0]
    except (Stopped, KeyboardInterrupt):
        raise Stopped(results, skipped) from None
    return results, skipped


def _tagged_grid(srv: ManagedServer, rnd: int, label: str, grid: GridSpec,
                 prompts: dict[tuple[int, int], list[str]], eos_ids: tuple[int, ...],
                 show_progress: bool, results: list[RunResult]) -> None:
    """``run_grid`` against ``srv``, each run tagged with its round and server and appended
    to ``results``, also the finished ones of an interrupted grid."""
    def tagged(runs):
        return [replace(r, round=rnd, server=srv.identity) for r in runs]

    try:
        results += tagged(run_grid(endpoint_for(srv, eos_ids), grid, prompts, label,
                                   show_progress))
    except Stopped as st:
        results += tagged(st.results)
        raise


"""``--compare --one-server``: auto, forced native and forced gather on ONE server process
(``slabserve serve --admin-endpoints``), the path switched before each run through
``POST /admin/attention-path``.  Separate processes of the same code differ by up to 1.41x
in tok/s on the GPU (docs/benchmarks/loadtest-gpu.md, A/A tests), which hides a 5% goal;
inside one process that spread is common to the three configurations.

Order: for each cell (context x concurrency), first one unmeasured pass of the cell's
load on the first path (the "prime": the KV pool grows its slabs, kernels and graphs for
the cell's shapes are built, so the first measured run does not pay for them alone; in a
one-round CPU grid without it, auto (first in every cell) trailed forced native (second,
the same code) by 2-6% in every cell), then for each
round every path configuration once, the order rotated by one per round (auto native
gather, native gather auto, ...), so neither slow drift nor the position in a round
favours one of them.  Each run warms up
after its switch and reads /metrics' path counters around its measured part, so its trace
shows the path that ran.  Results carry the labels ``auto`` / ``native`` / ``gather``
and their round, as ``grid.run_compare``'s do, so ``loadtest.compare`` reads them alike.
Other configurations (``mlx_lm``, ``--variant`` servers) then run as their own processes
through ``grid.run_compare``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import httpx

from slabserve.loadtest.grid import GridSpec, Stopped, endpoint_for, print_run, run_compare
from slabserve.loadtest.runner import RunResult, run_once
from slabserve.loadtest.servers import ManagedServer, ServerConfig

PATHS = ("auto", "native", "gather")
ADMIN_FLAG = "--admin-endpoints"
ADMIN_URL = "/admin/attention-path"
LABEL = "one-server"  # the shared server's name (its log: server-one-server.log)


def split_configs(configs: Sequence[ServerConfig]) -> tuple[list[ServerConfig],
                                                           list[ServerConfig]]:
    """(ours on auto / native / gather, served by one process; every other one)."""
    mine = [c for c in configs if c.kind == "slabserve" and c.label in PATHS]
    return mine, [c for c in configs if c not in mine]


def shared_server(mine: Sequence[ServerConfig]) -> ServerConfig:
    """The one server for ``mine``: selector on auto (no environment override), their
    extra ``serve`` arguments (the same for all of them), and the admin routes."""
    extra = mine[0].extra_args
    if any(c.extra_args != extra or c.extra_env != mine[0].extra_env for c in mine):
        raise ValueError("one server needs the same serve arguments for every path")
    return ServerConfig(LABEL, "slabserve", None, extra + (ADMIN_FLAG,), mine[0].extra_env)


def round_order(labels: Sequence[str], rnd: int) -> list[str]:
    """``labels`` rotated left by ``rnd`` places."""
    k = rnd % len(labels)
    return list(labels[k:]) + list(labels[:k])


def set_path(base_url: str, path: str, timeout_s: float = 120.0) -> None:
    """Switch the server's decode attention path; RuntimeError unless it says it did."""
    resp = httpx.post(base_url + ADMIN_URL, json={"path": path}, timeout=timeout_s)
    ok = resp.status_code == 200 and resp.json().get("path") == path
    if not ok:
        raise RuntimeError(f"POST {ADMIN_URL} {path!r}: {resp.status_code} {resp.text[:300]}")


def _path_runs(srv: ManagedServer, labels: Sequence[str], grid: GridSpec,
               prompts: dict[tuple[int, int], list[str]], eos_ids: tuple[int, ...],
               rounds: int, show_progress: bool, results: list[RunResult]) -> None:
    """Every cell, round and path against ``srv``; appends to ``results`` as it goes."""
    ep = endpoint_for(srv, eos_ids)
    for spec in grid.specs():
        cell = prompts[(spec.context, spec.concurrency)]
        set_path(srv.base_url, labels[0])  # the prime: unmeasured, see the module docstring
        asyncio.run(run_once(ep, spec, cell, f"{labels[0]} (prime)", show_progress))
        print(f"[{LABEL}] primed ctx={spec.context} conc={spec.concurrency}", file=sys.stderr)
        for rnd in range(rounds):
            for label in round_order(labels, rnd):
                set_path(srv.base_url, label)
                res = asyncio.run(run_once(ep, spec, cell, label, show_progress))
                results.append(replace(res, round=rnd, server=srv.identity))
                print_run(results[-1], f" round {rnd + 1}/{rounds}" if rounds > 1 else "")


def run_one_server(configs: Sequence[ServerConfig], model_dir: Path, grid: GridSpec,
                   prompts: dict[tuple[int, int], list[str]], eos_ids: tuple[int, ...],
                   log_dir: Path, ready_timeout_s: float = 300.0, show_progress: bool = True,
                   rounds: int = 1) -> tuple[list[RunResult], dict[str, str]]:
    """``grid.run_compare``'s contract (results, skipped label -> reason) with auto /
    native / gather served by one process (see the module docstring).  If that server
    fails to start or to switch, the runs so far are kept and every path label is
    reported as skipped (its comparison is incomplete)."""
    mine, rest = split_configs(configs)
    results: list[RunResult] = []
    skipped: dict[str, str] = {}
    try:
        if mine:
            labels = [c.label for c in mine]
            print(f"[{LABEL}] starting slabserve for {', '.join(labels)} ...",
                  file=sys.stderr)
            try:
                with ManagedServer(shared_server(mine), model_dir,
                                   log_dir / f"server-{LABEL}.log", ready_timeout_s) as srv:
                    _path_runs(srv, labels, grid, prompts, eos_ids, rounds, show_progress,
                               results)
            except (RuntimeError, TimeoutError, httpx.HTTPError, ValueError) as exc:
                print(f"[{LABEL}] failed: {exc}", file=sys.stderr)
                skipped.update({lab: str(exc).splitlines()[0] for lab in labels})
        if rest:
            more, more_skipped = run_compare(rest, model_dir, grid, prompts, eos_ids,
                                             log_dir, ready_timeout_s, show_progress, rounds)
            results += more
            skipped.update(more_skipped)
    except Stopped as st:  # from the separate servers: their finished runs too
        raise Stopped(results + st.results, {**skipped, **st.skipped}) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runs so far, the server stopped
        raise Stopped(results, skipped) from None
    return results, skipped

"""The side-by-side table of ``--compare`` and the issue's goals checked against it.

Reference labels: ``auto`` is ours as shipped, ``native`` / ``gather`` the forced paths,
``mlx_lm`` the baseline.  Ratios come from one invocation (same machine, same prompts).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from slabserve.loadtest.report import fmt, row
from slabserve.loadtest.runner import RunResult

OURS, BASE, FORCED = "auto", "mlx_lm", ("native", "gather")
AUTO_TOLERANCE = 0.95  # auto may trail the better forced path by at most 5%
TPUT_GOAL = 1.5  # at concurrency 8, ours >= 1.5x mlx_lm.server's output tokens/s
TPOT_GOAL = 0.7  # at concurrency 1, ours <= 0.7x mlx_lm.server's time per output token
TWIN_TOLERANCE = 0.05  # two processes of one configuration: tok/s within 5% of each other


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def lower_middle(ranked: Sequence):
    """The median of an ascending sequence, the lower middle one for an even count."""
    return ranked[(len(ranked) - 1) // 2]


def median_runs(results: Sequence[RunResult]) -> list[RunResult]:
    """One run per (label, context, concurrency): the median by output tok/s of its
    rounds (the lower middle one for an even count), in first-seen order.  With one round
    this is ``results`` itself."""
    groups: dict[tuple[str, int, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.label, r.spec.context, r.spec.concurrency), []).append(r)
    out = []
    for runs in groups.values():
        out.append(lower_middle(sorted(runs, key=lambda r: r.summary.output_tok_s)))
    return out


def cells(results: Sequence[RunResult]) -> dict[tuple[int, int], dict[str, dict]]:
    """(context, concurrency) -> label -> row."""
    out: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        x = row(r)
        out.setdefault((x["context"], x["concurrency"]), {})[x["label"]] = x
    return dict(sorted(out.items()))


def comparison_markdown(results: Sequence[RunResult], labels: Sequence[str]) -> str:
    """Output tok/s, TTFT p50, TPOT p50 and the server's mean decode step (ours only:
    /metrics' ``decode_step_seconds``) per configuration, then the ratios, ours' paths
    and the decode step graphs each of our servers traced during the run
    (``decode_graph_traces``: ``auto 7 / twin 9``), and the host's speed before each
    configuration's run (``host probe ms``: loadtest/hostprobe.py)."""
    head = ["ctx", "conc"]
    for lab in labels:
        head += [f"{lab} tok/s", f"{lab} TTFT p50", f"{lab} TPOT p50", f"{lab} step ms"]
    head += ["auto/mlx_lm tok/s", "auto/mlx_lm TTFT p50", "auto/best forced tok/s", "auto paths",
             "step graph traces", "host probe ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (ctx, conc), by in cells(results).items():
        cols = [str(ctx), str(conc)]
        for lab in labels:
            x = by.get(lab, {})
            cols += [fmt(x.get("output_tok_s"), 2), fmt(x.get("ttft_p50_ms"), 0),
                     fmt(x.get("tpot_p50_ms"), 1), _step(x)]
        ours, base = by.get(OURS, {}), by.get(BASE, {})
        best = _best_forced(by)
        cols += [fmt(_ratio(ours.get("output_tok_s"), base.get("output_tok_s")), 2),
                 fmt(_ratio(ours.get("ttft_p50_ms"), base.get("ttft_p50_ms")), 2),
                 fmt(_ratio(ours.get("output_tok_s"), best), 2), ours.get("paths", "-"),
                 _per_server(by, labels, "server_decode_graph_traces"),
                 _per_server(by, labels, "host_probe_ms")]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


PHASES = ("schedule", "forward", "sample", "wait", "update", "deliver")  # /metrics' phase labels


def phases_markdown(results: Sequence[RunResult], labels: Sequence[str]) -> str:
    """Per cell and server that reports them (ours): the mean decode step and its
    phases from /metrics' ``decode_step_phase_seconds``, the engine thread's CPU time
    outside the wait, and ``stall``, the rest of the host phases' wall time (step - wait
    - CPU: the engine thread off the CPU, waiting for the GIL or the OS, and on a CPU
    device for MLX's workers, which evaluate inside the forward), ms; ``ahead``: the
    share of those steps submitted while the one before them ran (async scheduling).
    Empty when no server reported phases."""
    head = ["ctx", "conc", "server", "step", *PHASES, "engine CPU", "stall", "ahead"]
    lines = []
    for (ctx, conc), by in cells(results).items():
        for lab in labels:
            x = by.get(lab, {})
            step, wait = x.get("server_decode_step_ms"), x.get("server_decode_wait_ms")
            cpu = x.get("server_decode_step_host_cpu_ms")
            if step is None or wait is None or cpu is None:
                continue
            cols = [str(ctx), str(conc), lab, fmt(step, 2)]
            cols += [fmt(x.get(f"server_decode_{p}_ms"), 2) for p in PHASES]
            share = x.get("server_decode_ahead_share")
            ahead = "-" if share is None else f"{100 * share:.0f}%"
            lines.append("| " + " | ".join(cols + [fmt(cpu, 2), fmt(step - wait - cpu, 2),
                                                   ahead]) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]) + "\n"


def _step(x: dict) -> str:
    """The server's mean decode step, with its median when the server reports one:
    ``5.71 (p50 4.40)`` (a mean far above the median is a tail: traces, collections)."""
    mean, p50 = fmt(x.get("server_decode_step_ms"), 2), x.get("server_decode_step_p50_ms")
    return mean if p50 is None else f"{mean} (p50 {fmt(p50, 2)})"


def _per_server(by: dict[str, dict], labels: Sequence[str], key: str) -> str:
    """A row field per configuration that has it, as whole numbers, e.g. ``auto 7 /
    twin 9`` (``server_decode_graph_traces``: step graphs traced; ``host_probe_ms``: the
    host probe before the run)."""
    got = [f"{lab} {fmt(by[lab][key], 0)}" for lab in labels
           if by.get(lab, {}).get(key) is not None]
    return " / ".join(got) or "-"


def _best_forced(by: dict[str, dict]) -> float | None:
    vals = [by[f]["output_tok_s"] for f in FORCED
            if f in by and not math.isnan(by[f]["output_tok_s"])]
    return max(vals) if vals else None


def goal_checks(results: Sequence[RunResult], twins: Sequence[str] = ()) -> list[str]:
    """One line per goal and cell: PASS / FAIL / n/a with the numbers behind it.
    ``twins``: labels of servers started with auto's arguments, each checked within
    ``TWIN_TOLERANCE`` of auto's tok/s."""
    lines = []
    for (ctx, conc), by in cells(results).items():
        for twin in twins:
            if by.get(OURS) and by.get(twin):
                r = _ratio(by[twin]["output_tok_s"], by[OURS]["output_tok_s"])
                ok = abs(r - 1.0) <= TWIN_TOLERANCE
                host = _ratio(by[twin].get("host_probe_ms"), by[OURS].get("host_probe_ms"))
                note = "" if math.isnan(host) else f"; host probe {twin}/auto {fmt(host, 2)}"
                lines.append(f"ctx {ctx} conc {conc}: {twin}/auto tok/s = {fmt(r, 3)} "
                             f"(goal within {TWIN_TOLERANCE:.0%}{note}) {_verdict(ok, r)}")
        ours, base = by.get(OURS), by.get(BASE)
        if ours and base and conc == 8:
            r = _ratio(ours["output_tok_s"], base["output_tok_s"])
            lines.append(f"ctx {ctx} conc 8: auto/mlx_lm output tok/s = {fmt(r, 2)} "
                         f"(goal >= {TPUT_GOAL}) {_verdict(r >= TPUT_GOAL, r)}")
        if ours and base and conc == 1:
            r = _ratio(ours["ttft_p50_ms"], base["ttft_p50_ms"])
            lines.append(f"ctx {ctx} conc 1: auto/mlx_lm TTFT p50 = {fmt(r, 2)} "
                         f"(goal <= 1.00) {_verdict(r <= 1.0, r)}")
            r = _ratio(ours["tpot_p50_ms"], base["tpot_p50_ms"])
            lines.append(f"ctx {ctx} conc 1: auto/mlx_lm TPOT p50 = {fmt(r, 2)} "
                         f"(goal <= {TPOT_GOAL}) {_verdict(r <= TPOT_GOAL, r)}")
        best = _best_forced(by)
        if ours and best:
            r = _ratio(ours["output_tok_s"], best)
            lines.append(f"ctx {ctx} conc {conc}: auto/best forced tok/s = {fmt(r, 2)} "
                         f"(goal >= {AUTO_TOLERANCE}) {_verdict(r >= AUTO_TOLERANCE, r)}")
            lines += _choice_check(ctx, conc, ours, by, best)
    return lines + _summary_check(results)


def _summary_check(results: Sequence[RunResult]) -> list[str]:
    """Over all cells: the geometric mean of auto / best forced with its 95% interval
    (``geo_interval``); PASS when even the interval's low end meets the tolerance."""
    ratios = []
    for by in cells(results).values():
        best = _best_forced(by)
        r = _ratio(by[OURS]["output_tok_s"], best) if OURS in by and best else math.nan
        if r > 0 and math.isfinite(r):
            ratios.append(r)
    if len(ratios) < 2:
        return []
    iv = geo_interval(ratios)
    return [f"all cells: auto/best forced tok/s {iv.describe()} (goal >= {AUTO_TOLERANCE}) "
            f"{_verdict(iv.lo >= AUTO_TOLERANCE, iv.lo)}"]


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    """Geometric mean of ``n`` ratios and a 95% interval for it (``lo``/``hi`` are the
    mean itself when ``n`` < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def describe(self) -> str:
        return (f"geometric mean {self.mean:.3f} over {self.n} cells "
                f"(95% interval {self.lo:.3f}-{self.hi:.3f})")


def geo_interval(ratios: Sequence[float]) -> Interval:
    """Geometric mean of positive ``ratios`` and a t-interval of the mean log ratio."""
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not logs:
        raise ValueError("no positive finite ratio")
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return Interval(math.exp(m), math.exp(m), math.exp(m), len(logs))
    df = len(logs) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return Interval(math.exp(m), math.exp(m - half), math.exp(m + half), len(logs))


def dominant_path(r: dict, share: float = 0.99) -> str | None:
    """The path a run's decisions took at least ``share`` of the time, from its
    ``path_counts`` (``{"native:reason": n}``), else None."""
    try:
        counts = json.loads(r.get("path_counts") or "{}")
    except ValueError:
        return None
    by_path: dict[str, float] = {}
    for key, n in counts.items():
        by_path[key.split(":", 1)[0]] = by_path.get(key.split(":", 1)[0], 0.0) + n
    total = sum(by_path.values())
    top = max(by_path, key=by_path.get) if total else None
    return top if top and by_path[top] >= share * total else None


def _choice_check(ctx: int, conc: int, ours: dict, by: dict, best: float) -> list[str]:
    """When auto ran one forced path's code throughout, auto vs that forced run is
    run-to-run variation between two server processes; what auto decided is whether that
    path was the faster one: its forced run's tok/s against the best forced run's."""
    p = dominant_path(ours)
    if p not in FORCED or p not in by:
        return []
    r = _ratio(by[p]["output_tok_s"], best)
    return [f"ctx {ctx} conc {conc}: auto ran {p} throughout (same code as forced {p}); "
            f"forced {p}/best forced tok/s = {fmt(r, 2)} (goal >= {AUTO_TOLERANCE}) "
            f"{_verdict(r >= AUTO_TOLERANCE, r)}"]


def path_checks(results: Sequence[RunResult]) -> list[str]:
    """A forced configuration that did not run its path 100% of the time (declined, or the
    override ignored) would make the comparison meaningless: one line per such run."""
    lines = []
    for r in results:
        if r.label in FORCED and r.trace is not None and r.trace.total:
            share = r.trace.shares().get(r.label, 0.0)
            if share < 1.0:
                lines.append(f"WARNING {r.label} ctx {r.spec.context} conc "
                             f"{r.spec.concurrency}: forced path ran {share:.1%} of decisions "
                             f"({r.trace.describe(reasons=True)})")
    return lines


def _verdict(ok: bool, r: float) -> str:
    return "n/a" if math.isnan(r) else ("PASS" if ok else "FAIL")


def comparison_section(results: Sequence[RunResult], picked: Sequence[RunResult],
                       labels: Sequence[str], one_server: bool,
                       twins: Sequence[str] = ()) -> list[str]:
    """results.md's lines from ``## Comparison`` on: the side-by-side table of the
    ``picked`` runs (``median_runs``), our servers' decode step phases, the goals
    (``twins``: as ``goal_checks``)."""
    rounds = 1 + max((r.round for r in results), default=0)
    how = (f"the median run by tok/s of {rounds} interleaved rounds per cell"
           if rounds > 1 else "ratios from this one invocation")
    if one_server:
        how += "; auto, native and gather on one server process, switched per run"
    md = [f"## Comparison ({how})", "", comparison_markdown(picked, labels)]
    phases = phases_markdown(picked, labels)
    if phases:
        md += ["### Our servers' decode steps", "", "Mean ms per decode-only step, its "
               "phases, the engine thread's CPU time outside the wait, and stall = step - "
               "wait - CPU (the thread off the CPU: the GIL, the OS, or on a CPU device "
               "MLX's workers evaluating the forward), and ahead, the share of steps "
               "submitted while the one before them ran (async scheduling: a step not "
               "ahead waits for all its device time).", "", phases]
    md += ["## Goals", ""]
    checks = goal_checks(picked, twins) + path_checks(results)
    return md + [f"- {line}" for line in checks] + [""]

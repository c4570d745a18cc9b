"""Writing runs out: flat rows as JSON, CSV and markdown, and PNG plots per context."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from slabserve.loadtest.runner import RunResult

DISTS = ("ttft", "itl", "tpot", "e2e")
STATS = ("mean", "p50", "p90", "p99")


def row(res: RunResult) -> dict:
    """One flat dict per run: identifiers, counts, rates, latency stats (ms), path shares."""
    s = res.summary
    out: dict = {
        "label": res.label, "round": res.round, "server": res.server,
        "context": res.spec.context,
        "concurrency": res.spec.concurrency,
        "max_tokens": res.spec.max_tokens, "prompt_tokens": s.prompt_tokens_mean,
        "requests_ok": s.requests_ok, "requests_failed": s.requests_failed,
        "failures": ";".join(f"{k}:{v}" for k, v in s.failures.items()),
        "short_outputs": s.short_outputs, "cached_tokens": s.cached_tokens,
        "duration_s": s.duration_s, "output_tok_s": s.output_tok_s, "requests_s": s.requests_s,
        "host_probe_ms": res.host_probe_ms,
    }
    for d in DISTS:
        dist = getattr(s, d)
        for st in STATS:
            out[f"{d}_{st}_ms"] = getattr(dist, st)
    out["paths"] = res.trace.describe() if res.trace is not None else "n/a"
    out["path_reasons"] = res.trace.describe(reasons=True) if res.trace is not None else "n/a"
    out["path_counts"] = json.dumps(res.trace.by_reason) if res.trace is not None else ""
    c = res.server_counters
    for key in ("num_preemptions", "prompt_tokens", "generation_tokens", "decode_graph_traces"):
        out[f"server_{key}"] = c.get(key)
    steps = c.get("decode_step_seconds_count")  # the server's decode-only steps in the run
    out["server_decode_step_ms"] = None
    for key, total in c.items():  # decode_step_seconds_sum -> server_decode_step_ms, ...
        if key.startswith("decode_") and key.endswith("_seconds_sum"):
            name = key.removeprefix("decode_").removesuffix("_seconds_sum")
            out[f"server_decode_{name}_ms"] = 1e3 * total / steps if steps else None
    ahead = c.get("decode_steps_ahead")  # share of them submitted ahead (async scheduling)
    out["server_decode_ahead_share"] = ahead / steps if ahead is not None and steps else None
    p50 = c.get("decode_step_p50_seconds")
    out["server_decode_step_p50_ms"] = 1e3 * p50 if p50 is not None else None
    return out


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_json(path: Path, results: Sequence[RunResult], meta: dict) -> None:
    runs = []
    for r in results:
        runs.append({
            "row": {k: _clean(v) for k, v in row(r).items()},
            "spec": asdict(r.spec),
            "trace": None if r.trace is None else {"by_path": r.trace.by_path,
                                                   "by_reason": r.trace.by_reason},
            "records": [asdict(rec) for rec in r.records],
        })
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


def write_csv(path: Path, results: Sequence[RunResult]) -> None:
    rows = [row(r) for r in results]
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for x in rows for k in x)))
        w.writeheader()
        w.writerows(rows)


def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


RUN_HEADER = ("| config | ctx | conc | ok/fail | out tok/s | req/s | TTFT p50 / p90 / p99 ms "
              "| ITL p50 / p99 ms | TPOT mean / p50 / p90 ms | E2E p50 / p99 ms | paths |")


def _round_tags(results: Sequence[RunResult]) -> list[str]:
    """`` (round N)`` per run when the results span several rounds, else ''."""
    several = any(r.round for r in results)
    return [f" (round {r.round + 1})" if several else "" for r in results]


def failure_details(results: Sequence[RunResult]) -> list[str]:
    """One line per run and failure kind: how many (the run's summary), and what the
    first one that said anything said."""
    lines = []
    for r, tag in zip(results, _round_tags(results), strict=True):
        for kind, n in r.summary.failures.items():
            detail = next((x.detail for x in r.records if x.error == kind and x.detail), None)
            said = f": {detail}" if detail else ""
            lines.append(f"{r.label}{tag} ctx {r.spec.context} conc {r.spec.concurrency}: "
                         f"{n} x {kind}{said}")
    return lines


def runs_markdown(results: Sequence[RunResult]) -> str:
    """One table row per run; failures by kind after ``ok/fail``."""
    lines = [RUN_HEADER, "|" + "---|" * 11]
    for r, tag in zip(results, _round_tags(results), strict=True):
        x = row(r)
        fails = f" ({x['failures']})" if x["failures"] else ""
        lines.append(
            f"| {x['label']}{tag} | {x['context']} | {x['concurrency']} "
            f"| {x['requests_ok']}/{x['requests_failed']}{fails} "
            f"| {fmt(x['output_tok_s'], 2)} | {fmt(x['requests_s'], 3)} "
            f"| {fmt(x['ttft_p50_ms'], 0)} / {fmt(x['ttft_p90_ms'], 0)} / "
            f"{fmt(x['ttft_p99_ms'], 0)} "
            f"| {fmt(x['itl_p50_ms'])} / {fmt(x['itl_p99_ms'])} "
            f"| {fmt(x['tpot_mean_ms'])} / {fmt(x['tpot_p50_ms'])} / {fmt(x['tpot_p90_ms'])} "
            f"| {fmt(x['e2e_p50_ms'], 0)} / {fmt(x['e2e_p99_ms'], 0)} | {x['path_reasons']} |")
    return "\n".join(lines) + "\n"


PLOTTED = (("output_tok_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
           ("tpot_p50_ms", "TPOT p50 (ms)"), ("e2e_p50_ms", "E2E p50 (ms)"))


def write_plots(out_dir: Path, results: Sequence[RunResult]) -> list[Path]:
    """One PNG per context: throughput and latencies against concurrency, one line per
    configuration.  Returns the files written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [row(r) for r in results]
    written = []
    for ctx in sorted({x["context"] for x in rows}):
        fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6))
        for ax, (key, title) in zip(axes, PLOTTED, strict=True):
            for label in dict.fromkeys(x["label"] for x in rows):
                pts = sorted((x["concurrency"], x[key]) for x in rows
                             if x["label"] == label and x["context"] == ctx)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set_title(title)
            ax.set_xlabel("concurrency")
            ax.set_xticks(sorted({x["concurrency"] for x in rows}))
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"context {ctx} tokens")
        fig.tight_layout()
        path = out_dir / f"loadtest_ctx{ctx}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written

"""``--scenario chat`` against one endpoint (``--url``) or, with ``--compare``, against each
configuration's own server process in turn (``grid.endpoint_for``: ours with
``ignore_eos``, mlx_lm.server with the EOS ``logit_bias``), the same texts for all; and the
results written as ``chat.json`` and ``chat.md`` with the ratios against mlx_lm."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from slabserve.loadtest.chat import ChatResult, ChatSpec, ChatTexts, print_chat, run_chat
from slabserve.loadtest.client import Endpoint
from slabserve.loadtest.grid import Stopped, endpoint_for, on_each_server
from slabserve.loadtest.report import fmt
from slabserve.loadtest.servers import ManagedServer, ServerConfig

BASE = "mlx_lm"


def chat_kv_tokens(spec: ChatSpec, template_slack: int = 64) -> int:
    """Tokens resident when every session holds its whole history at the last turn (plus
    some per message for the chat template)."""
    per_turn = spec.user_tokens + spec.reply_tokens + template_slack
    return spec.sessions * (spec.system_tokens + template_slack + spec.turns * per_turn)


def run_chat_url(ep: Endpoint, spec: ChatSpec, texts: ChatTexts, label: str,
                 show_progress: bool = True) -> list[ChatResult]:
    """The scenario once against ``ep``; interrupted, ``Stopped`` with no results."""
    try:
        res = asyncio.run(run_chat(ep, spec, texts, label, show_progress))
    except KeyboardInterrupt:
        raise Stopped([]) from None
    print_chat(res)
    return [res]


def run_chat_compare(configs: Sequence[ServerConfig], model_dir: Path, spec: ChatSpec,
                     texts: ChatTexts, eos_ids: tuple[int, ...], log_dir: Path,
                     ready_timeout_s: float = 300.0, show_progress: bool = True
                     ) -> tuple[list[ChatResult], dict[str, str]]:
    """Each configuration on its own loopback server, one after another; one that fails
    to start is skipped (label -> reason).  Interrupted: ``Stopped`` with the finished."""
    def run(srv: ManagedServer, _rnd: int, results: list) -> None:
        ep = endpoint_for(srv, eos_ids)
        res = asyncio.run(run_chat(ep, spec, texts, srv.cfg.label, show_progress))
        results.append(replace(res, server=srv.identity))
        print_chat(res)

    return on_each_server(configs, model_dir, log_dir, ready_timeout_s, run)


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


RUNS_HEADER = ("| config | ok/fail | TTFT turn 1 p50 / p90 ms | TTFT turns 2+ p50 / p90 ms "
               "| TPOT p50 ms | out tok/s | wall s | prompt tokens | cached share "
               "| preemptions |")


def chat_runs_markdown(results: Sequence[ChatResult]) -> str:
    """One row per run."""
    lines = [RUNS_HEADER, "|" + "---|" * 10]
    for r in results:
        s = r.summary
        fails = "".join(f" ({k}:{v})" for k, v in s.failures.items())
        lines.append(
            f"| {r.label} | {s.requests_ok}/{s.requests_failed}{fails} "
            f"| {fmt(s.first_ttft.p50, 0)} / {fmt(s.first_ttft.p90, 0)} "
            f"| {fmt(s.later_ttft.p50, 0)} / {fmt(s.later_ttft.p90, 0)} "
            f"| {fmt(s.tpot.p50)} | {fmt(s.output_tok_s, 2)} | {fmt(s.wall_s, 2)} "
            f"| {s.prompt_tokens} | {_share(s.cached_share)} "
            f"| {'n/a' if r.preemptions is None else f'{r.preemptions:.0f}'} |")
    return "\n".join(lines) + "\n"


def chat_ratio_rows(results: Sequence[ChatResult]) -> list[dict]:
    """Per run: later-turn TTFT p50 / mlx_lm's, its own later / first-turn TTFT p50, and
    output tok/s / mlx_lm's (NaN where mlx_lm did not run)."""
    base = next((r.summary for r in results if r.label == BASE), None)
    rows = []
    for r in results:
        s = r.summary
        rows.append({
            "label": r.label,
            "later_ttft_vs_mlx_lm": _ratio(s.later_ttft.p50, base and base.later_ttft.p50),
            "later_vs_first_ttft": _ratio(s.later_ttft.p50, s.first_ttft.p50),
            "tok_s_vs_mlx_lm": _ratio(s.output_tok_s, base and base.output_tok_s)})
    return rows


def chat_ratio_markdown(results: Sequence[ChatResult]) -> str:
    lines = ["| config | TTFT turns 2+ p50 / mlx_lm's | TTFT turns 2+ / turn 1 (p50) "
             "| out tok/s / mlx_lm's |", "|---|---|---|---|"]
    for x in chat_ratio_rows(results):
        lines.append(f"| {x['label']} | {fmt(x['later_ttft_vs_mlx_lm'], 2)} "
                     f"| {fmt(x['later_vs_first_ttft'], 2)} | {fmt(x['tok_s_vs_mlx_lm'], 2)} |")
    return "\n".join(lines) + "\n"


def _clean(v):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def chat_json(results: Sequence[ChatResult], meta: dict) -> dict:
    ratios = {x["label"]: x for x in chat_ratio_rows(results)}
    runs = [{"label": r.label, "server": r.server, "spec": asdict(r.spec),
             "summary": asdict(r.summary), "warmup_failed": r.warmup_failed,
             "ratios": ratios[r.label], "turns": [asdict(t) for t in r.turns]}
            for r in results]
    return _clean({"meta": meta, "runs": runs})


def _failure_lines(results: Sequence[ChatResult]) -> list[str]:
    lines = []
    for r in results:
        for kind, n in r.summary.failures.items():
            detail = next((t.record.detail for t in r.turns
                           if t.record.error == kind and t.record.detail), None)
            lines.append(f"- `{r.label}: {n} x {kind}{': ' + detail if detail else ''}`")
        if r.warmup_failed:
            lines.append(f"- `{r.label}: {r.warmup_failed} warm-up requests failed`")
    return lines


def write_chat_outputs(out: Path, results: Sequence[ChatResult], spec: ChatSpec,
                       meta: dict) -> Path:
    """``chat.json`` (meta, per run: summary, ratios, every turn) and ``chat.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat.json").write_text(json.dumps(chat_json(results, meta), indent=1))
    md = [f"# Chat load test {meta['started_utc']}", "", f"Command: `{meta['command']}`", "",
          f"Model: `{meta['model']}`; tokenizer: `{meta['tokenizer']}`; "
          f"machine: {meta['machine']}; versions: {meta['versions']}", "",
          f"Scenario: {spec.sessions} sessions x {spec.turns} turns, shared system prompt "
          f"{spec.system_tokens} tokens, user messages {spec.user_tokens} tokens, replies "
          f"{spec.reply_tokens} tokens, {spec.warmup_requests} warm-up sessions (every turn, "
          "texts of their own).", "",
          "## Runs", "", chat_runs_markdown(results),
          "## Ratios", "", chat_ratio_markdown(results)]
    if meta.get("stopped_early"):
        md += [f"**Stopped early**: {meta['stopped_early']}", ""]
    fails = _failure_lines(results)
    if fails:
        md += ["Failures (first message of each kind):", ""] + fails + [""]
    md += [f"Not run: {lab} ({why})" for lab, why in meta.get("skipped", {}).items()]
    (out / "chat.md").write_text("\n".join(md) + "\n")
    return out / "chat.md"

"""``slabserve loadtest``: load an OpenAI-compatible server, or ``--compare`` ours (auto,
forced native, forced gather) with ``mlx_lm.server`` on the same model.

Examples::

    slabserve loadtest --url http://127.0.0.1:8000 --model DIR --contexts 1k,4k
    slabserve loadtest --url http://127.0.0.1:8080 --model DIR --eos-mode logit_bias
    slabserve loadtest --compare --embedded qwen2.5-0.5b:float16 --contexts 1k --out results/
    slabserve loadtest --compare --one-server --configs auto,native,gather --rounds 3 ...
    slabserve loadtest --compare --scenario chat --configs auto,mlx_lm --embedded tiny \
        --variant nocache=--no-prefix-caching --sessions 4 --turns 4 --system-tokens 3000

This package is an HTTP client: it never imports mlx, the engine or the scheduler; servers and
the embedded-model writer run as subprocesses.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

from slabserve.loadtest.chat import ChatSpec, build_chat_texts
from slabserve.loadtest.chatcompare import (
    chat_kv_tokens,
    run_chat_compare,
    run_chat_url,
    write_chat_outputs,
)
from slabserve.loadtest.client import Endpoint
from slabserve.loadtest.compare import comparison_section, median_runs
from slabserve.loadtest.grid import GridSpec, Stopped, build_prompts, run_compare, run_grid
from slabserve.loadtest.oneserver import run_one_server
from slabserve.loadtest.prompts import char_tokenizer, eos_token_ids, load_tokenizer
from slabserve.loadtest.report import (
    failure_details,
    runs_markdown,
    write_csv,
    write_json,
    write_plots,
)
from slabserve.loadtest.runner import RunResult
from slabserve.loadtest.servers import ROOT, STANDARD, kv_budget_args, mlx_lm_installed


def parse_size(text: str) -> int:
    """``1k`` -> 1024, ``16K`` -> 16384, ``300`` -> 300."""
    t = text.strip().lower()
    return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


def _ints(text: str, conv=int) -> tuple[int, ...]:
    return tuple(conv(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slabserve loadtest",
        description="Load an OpenAI-compatible server (--url) or compare ours (auto, forced "
                    "native, forced gather) with mlx_lm.server on one model (--compare).")
    tgt = p.add_argument_group("target")
    tgt.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    tgt.add_argument("--compare", action="store_true",
                     help="start ours (auto/native/gather) and mlx_lm.server on loopback")
    tgt.add_argument("--one-server", action="store_true",
                     help="--compare: serve auto/native/gather from ONE server process, "
                     "switching the path before each run (POST /admin/attention-path), "
                     "interleaved per cell and round; mlx_lm and --variant still get their "
                     "own processes")
    tgt.add_argument("--configs", default="auto,native,gather,mlx_lm",
                     help="--compare configurations (default: all four)")
    tgt.add_argument("--model", type=Path, help="model directory (tokenizer, EOS ids; served "
                     "by --compare)")
    tgt.add_argument("--embedded", help="embedded model NAME[:DTYPE] written via "
                     "slabserve.engine.embedded.ensure_model in a subprocess "
                     "(e.g. qwen2.5-0.5b:float16)")
    tgt.add_argument("--model-name", help="'model' field to send in --url mode (default none)")
    tgt.add_argument("--eos-mode", default="ignore_eos",
                     choices=("ignore_eos", "logit_bias", "none"),
                     help="--url mode: how to force max_tokens outputs (mlx_lm.server: "
                          "logit_bias)")
    tgt.add_argument("--server-arg", action="append", default=[],
                     help="extra argument for 'slabserve serve' (repeatable; write "
                     "--server-arg=--max-running=16)")
    tgt.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                     help="--compare: one more of our servers (selector on auto) with extra "
                     "'slabserve serve' arguments, e.g. --variant 'step8k=--max-step-tokens "
                     "8256' (repeatable; runs after --configs)")
    tgt.add_argument("--rounds", type=int, default=1,
                     help="--compare: pass over all configurations this many times, "
                     "interleaved; ratios use each cell's median run by tok/s")
    tgt.add_argument("--ready-timeout", type=float, default=300.0,
                     help="seconds a launched server may take to answer /health")
    _load_arguments(p)
    _chat_arguments(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default loadtest-results/UTC-TIMESTAMP)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_arguments(p: argparse.ArgumentParser) -> None:
    load = p.add_argument_group("load")
    load.add_argument("--contexts", default="1k,4k,16k", help="prompt + output tokens")
    load.add_argument("--concurrency", default="1,4,8")
    load.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    load.add_argument("--requests", default=None,
                      help="measured requests per run: N, or one per concurrency level "
                           "(e.g. 4,4,8); default max(4, 2 x concurrency)")
    load.add_argument("--duration", type=float, default=120.0,
                      help="seconds per run after which no new request starts")
    load.add_argument("--warmup", type=int, default=None,
                      help="warm-up requests per run (default: the run's concurrency, sent "
                           "concurrently, so batched shapes are warm before measuring; "
                           "--scenario chat: warm-up sessions, as many as measured, every turn, "
                           "on texts of their own)")
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--length-spread", type=float, default=0.0,
                      help="prompt lengths uniform in [(1-F) x, x] of the context's prompt "
                      "(default 0: all exactly the context; e.g. 0.5 for mixed traffic)")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    chat = p.add_argument_group("chat scenario (--scenario chat)")
    chat.add_argument("--scenario", choices=("default", "chat"), default="default",
                      help="default: the contexts x concurrency grid; chat: concurrent "
                      "multi-turn chat sessions sharing one system prompt, the whole history "
                      "sent each turn (for prefix caching; writes chat.json / chat.md)")
    chat.add_argument("--sessions", type=int, default=4,
                      help="concurrent chat sessions, one worker each (default %(default)s)")
    chat.add_argument("--turns", type=int, default=4,
                      help="turns per session (default %(default)s)")
    chat.add_argument("--system-tokens", type=int, default=3000,
                      help="shared system prompt, model tokens (default %(default)s)")
    chat.add_argument("--user-tokens", type=int, default=64,
                      help="tokens per user message (default %(default)s)")
    chat.add_argument("--reply-tokens", type=int, default=32,
                      help="max_tokens per reply, forced like --max-tokens (default "
                      "%(default)s)")


def resolve_model(args: argparse.Namespace) -> Path | None:
    """``--model`` as given, or the embedded model's directory (written on first use)."""
    if args.model is not None:
        return args.model
    if args.embedded is None:
        return None
    name, _, dtype = args.embedded.partition(":")
    code = ("import sys; from slabserve import env; "
            "from slabserve.engine.embedded import ensure_model; "
            "print(ensure_model(sys.argv[1], sys.argv[2], cache_dir=env.cache_dir()))")
    proc = subprocess.run([sys.executable, "-c", code, name, dtype or "float32"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"--embedded {args.embedded}: could not write the model:\n"
                         + proc.stderr[-2000:])
    return Path(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mlx", "mlx-lm", "httpx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_outputs(out: Path, results: list[RunResult], meta: dict, labels: list[str]) -> Path:
    """results.{json,csv,md} and PNG plots in ``out``; returns the markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results, meta)
    write_csv(out / "results.csv", results)
    picked = median_runs(results)
    plots = write_plots(out, picked)
    md = [f"# Load test {meta['started_utc']}", "", f"Command: `{meta['command']}`", "",
          f"Model: `{meta['model']}`; tokenizer: `{meta['tokenizer']}`; "
          f"machine: {meta['machine']}; versions: {meta['versions']}", "",
          "## Runs", "", runs_markdown(results)]
    if meta.get("stopped_early"):
        md[-3:-3] = [f"**Stopped early**: {meta['stopped_early']}; below are the finished "
                     "runs, and the comparison uses what there is.", ""]
    fails = failure_details(results)
    if fails:
        md += ["", "Failures (first message of each kind, as the server or client said it):",
               ""] + [f"- `{line}`" for line in fails] + [""]
    md += [f"Not run: {lab} ({why})" for lab, why in meta.get("skipped", {}).items()]
    if len(labels) > 1:
        md += comparison_section(results, picked, labels, bool(meta.get("one_server")),
                                 meta.get("twins", ()))
    md += [f"![{p.name}]({p.name})" for p in plots]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return out / "results.md"


def _grid(args: argparse.Namespace) -> GridSpec:
    requests = _ints(args.requests) if args.requests else None
    return GridSpec(_ints(args.contexts, parse_size), _ints(args.concurrency), args.max_tokens,
                    requests, args.duration, args.warmup, args.timeout, args.seed,
                    args.length_spread)


def _configs(args: argparse.Namespace, model: Path, grid: GridSpec) -> list:
    return _configs_for(args, model, max(grid.contexts) * max(grid.concurrency))


def _configs_for(args: argparse.Namespace, model: Path, kv_tokens: int) -> list:
    """The --compare server configurations, ours with a KV budget for ``kv_tokens``."""
    labels = [x.strip() for x in args.configs.split(",") if x.strip()]
    unknown = [lab for lab in labels if lab not in STANDARD]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {sorted(STANDARD)}")
    if "mlx_lm" in labels and not mlx_lm_installed():
        print("mlx-lm is not installed: skipping mlx_lm", file=sys.stderr)
        labels.remove("mlx_lm")
    extra = tuple(args.server_arg)
    extra += kv_budget_args(model, kv_tokens, extra)
    configs = [STANDARD[lab] if STANDARD[lab].kind == "mlx_lm"
               else replace(STANDARD[lab], extra_args=extra) for lab in labels]
    return configs + [replace(STANDARD["auto"], label=lab, extra_args=extra + more)
                      for lab, more in parse_variants(args.variant, labels)]


def parse_variants(texts: list[str], taken: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``LABEL=ARGS`` strings as (label, shell-split args); labels must be new and unique."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for text in texts:
        label, sep, rest = text.partition("=")
        label = label.strip()
        if not sep or not label or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise SystemExit(f"--variant {text!r}: write LABEL=ARGS (label: letters, digits, "
                             "_.+-)")
        if label in STANDARD or label in taken or label in (x[0] for x in out):
            raise SystemExit(f"--variant label {label!r} is already used")
        out.append((label, tuple(shlex.split(rest))))
    return out


def _check(args: argparse.Namespace, model: Path | None, eos_ids: tuple[int, ...]) -> str:
    """Why the arguments cannot run ('' when they can)."""
    if bool(args.url) == bool(args.compare):
        return "give exactly one of --url and --compare"
    if args.compare and model is None:
        return "--compare needs --model DIR or --embedded NAME"
    if args.url and args.eos_mode == "logit_bias" and not eos_ids:
        return "--eos-mode logit_bias needs --model DIR (for the EOS ids)"
    if args.rounds < 1:
        return "--rounds must be >= 1"
    if args.url and (args.rounds > 1 or args.variant or args.one_server):
        return "--rounds, --variant and --one-server need --compare"
    if args.scenario == "chat" and (args.rounds > 1 or args.one_server):
        return "--scenario chat runs each configuration once: no --rounds, --one-server"
    sizes = (args.sessions, args.turns, args.system_tokens, args.user_tokens, args.reply_tokens)
    if args.scenario == "chat" and min(sizes) < 1:
        return "--sessions, --turns and the --*-tokens sizes must be >= 1"
    return ""


def _execute(args, model, grid, prompts, eos_ids, out) -> tuple[list, list, dict, str]:
    """Run the load: (results, labels, skipped configurations, why it stopped early or
    ""); Ctrl-C or SIGTERM (``timeout``) stop it with the runs finished so far."""
    progress = not args.no_progress
    configs = _configs(args, model, grid) if args.compare else []
    labels = [c.label for c in configs] or [args.model_name or "server"]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        if args.compare:
            run = run_one_server if args.one_server else run_compare
            results, skipped = run(configs, model, grid, prompts, eos_ids, out,
                                   args.ready_timeout, progress, args.rounds)
        else:
            ep = Endpoint(args.url, args.model_name, args.eos_mode, eos_ids)
            results, skipped = run_grid(ep, grid, prompts, labels[0], progress), {}
    except Stopped as st:
        why = f"interrupted after {len(st.results)} finished runs (Ctrl-C or SIGTERM)"
        print(f"stopped: {why}", file=sys.stderr)
        return st.results, labels, st.skipped, why
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return results, labels, skipped, ""


def _interrupt(signum, frame) -> None:
    """SIGTERM (what ``timeout`` sends) stops the load like Ctrl-C."""
    raise KeyboardInterrupt


def _with_sigterm(fn, *args):
    """``fn(*args)`` with SIGTERM raising KeyboardInterrupt (on the main thread)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return fn(*args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _meta(args, argv, started, model, tok, labels, skipped, stopped) -> dict:
    """What every results file records about the invocation."""
    return {"started_utc": started, "command": "slabserve loadtest " + shlex.join(argv),
            "stopped_early": stopped,
            "model": str(model), "tokenizer": tok.name, "labels": labels,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "versions": _versions(), "skipped": skipped,
            # variants with auto's arguments (``--variant twin=``): the process spread
            "twins": [lab for lab, more in parse_variants(getattr(args, "variant", []), [])
                      if not more]}


def _chat_spec(args: argparse.Namespace) -> ChatSpec:
    return ChatSpec(args.sessions, args.turns, args.system_tokens, args.user_tokens,
                    args.reply_tokens, args.warmup, args.timeout, args.seed)


def _run_chat(args, argv, model, tok, eos_ids, out, started) -> int:
    """``--scenario chat``: each configuration (or the --url endpoint) once; chat.json and
    chat.md in ``out``; exit code as ``main``'s."""
    spec = _chat_spec(args)
    texts = build_chat_texts(spec, tok)
    configs = _configs_for(args, model, chat_kv_tokens(spec)) if args.compare else []
    labels = [c.label for c in configs] or [args.model_name or "server"]
    results, skipped, stopped = _with_sigterm(_chat_load, args, model, spec, texts, eos_ids,
                                              out, configs, labels[0])
    meta = _meta(args, argv, started, model, tok, labels, skipped, stopped)
    meta["chat"] = asdict(spec)
    md = write_chat_outputs(out, results, spec, meta)
    print(md.read_text())
    failed = sum(r.summary.requests_failed + r.warmup_failed for r in results)
    return 0 if results and not failed and not skipped and not stopped else 1


def _chat_load(args, model, spec, texts, eos_ids, out, configs, label) -> tuple:
    """(results, skipped configurations, why it stopped early or "")."""
    progress = not args.no_progress
    try:
        if args.compare:
            return (*run_chat_compare(configs, model, spec, texts, eos_ids, out,
                                      args.ready_timeout, progress), "")
        ep = Endpoint(args.url, args.model_name, args.eos_mode, eos_ids)
        return run_chat_url(ep, spec, texts, label, progress), {}, ""
    except Stopped as st:
        why = f"interrupted after {len(st.results)} finished runs (Ctrl-C or SIGTERM)"
        print(f"stopped: {why}", file=sys.stderr)
        return st.results, st.skipped, why


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slabserve loadtest``; exit code 0 only when every configuration ran
    and no request failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    model = resolve_model(args) if (args.model or args.embedded) else None
    eos_ids = eos_token_ids(model) if model is not None else ()
    problem = _check(args, model, eos_ids)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    tok = load_tokenizer(model) if model is not None else char_tokenizer()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = args.out or Path("loadtest-results") / started.replace(":", "")
    if args.scenario == "chat":
        return _run_chat(args, argv, model, tok, eos_ids, out, started)
    grid = _grid(args)
    t0 = time.perf_counter()
    prompts = build_prompts(grid, tok)
    print(f"prompts built in {time.perf_counter() - t0:.1f}s ({tok.name})", file=sys.stderr)
    results, labels, skipped, stopped = _execute(args, model, grid, prompts, eos_ids, out)
    meta = _meta(args, argv, started, model, tok, labels, skipped, stopped)
    meta.update(grid=asdict(grid), one_server=bool(args.one_server))
    md = write_outputs(out, results, meta, labels)
    print(md.read_text())
    failed = sum(r.summary.requests_failed for r in results)
    return 0 if results and not failed and not skipped and not stopped else 1


if __name__ == "__main__":
    sys.exit(main())

"""``slabserve bench tensor-parallel``: one model served by one process and by N ranks
under ``mlx.launch`` (ours tensor and pipeline parallel, and ``mlx_lm.server``), the same
closed-loop load against each, ratios from this one invocation
(docs/benchmarks/tensor-parallel.md).

Configurations (``--configs``): ``ours-1`` (``slabserve serve``), ``ours-N`` (the same under
``mlx.launch -n N --backend ring``, tensor parallel), ``pipe-N`` (the same with
``--pipeline``), ``mlx_lm-N`` (``mlx_lm.server`` under the same launcher), ``mlx_lm-1``.
Each starts on loopback in turn, runs the load tester's grid (``slabserve.loadtest``:
streamed ``/v1/completions``, greedy, exactly ``--max-tokens`` output tokens, the same
prompts for every configuration), and stops.  Ours also reports its KV pool in tokens
(``/metrics``): at one ``--kv-budget`` per rank it grows with N.

The launcher gets a pipe as stdin (``mlx.launch`` spins on a closed one); ranks under it get
``--rank-env`` (default ``OPENBLAS_NUM_THREADS=1``: one core per rank on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from slabserve.loadtest.__main__ import parse_size, resolve_model
from slabserve.loadtest.grid import GridSpec, build_prompts, endpoint_for, run_grid
from slabserve.loadtest.prompts import eos_token_ids, load_tokenizer
from slabserve.loadtest.report import write_json
from slabserve.loadtest.servers import ROOT, ManagedServer, ServerConfig, free_port

LAUNCH = Path(sys.executable).parent / "mlx.launch"


class LaunchedServer(ManagedServer):
    """``ManagedServer`` under ``mlx.launch -n RANKS --backend ring`` when ``ranks`` > 1.
    Stopping sends SIGTERM to the launcher only (ours then drain and end every rank), then
    ends what is left of its process group (``mlx_lm.server``'s ranks outlive their
    launcher)."""

    term_group = False

    def __init__(self, cfg: ServerConfig, model_dir: Path, log_path: Path, ranks: int,
                 rank_env: tuple[str, ...], ready_timeout_s: float) -> None:
        super().__init__(cfg, model_dir, log_path, ready_timeout_s)
        self.ranks = ranks
        if ranks > 1:
            envs = [a for e in rank_env for a in ("--env", e)]
            self.argv = [str(LAUNCH), "-n", str(ranks), "--backend", "ring",
                         "--starting-port", str(free_port()), *envs, "--", *self.argv]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float | None = None) -> None:
        pgid = self.proc.pid if self.proc is not None else None
        super().stop(grace_s)
        if pgid is not None:
            _end_group(pgid, self.stop_grace_s)

    def kv_tokens(self) -> int | None:
        """Our KV pool in tokens (blocks x block size from ``/metrics``); None for mlx_lm."""
        if self.cfg.kind != "slabserve":
            return None
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        info = next(ln for ln in text.splitlines()
                    if ln.startswith("slabserve:cache_config_info{"))
        labels = dict(kv.split("=", 1) for kv in info.split("{", 1)[1].split("}")[0].split(","))
        return int(labels["block_size"].strip('"')) * int(labels["num_gpu_blocks"].strip('"'))


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, whatever of process group ``pgid`` is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return


def parse_configs(text: str, ranks: int) -> list[tuple[str, ServerConfig, int]]:
    """``ours-1``, ``ours-N`` (tensor parallel), ``pipe-N`` (ours with ``--pipeline``),
    ``mlx_lm-N``, ``mlx_lm-1`` -> (label, server config without the KV budget, ranks)."""
    out = []
    for label in (x.strip() for x in text.split(",") if x.strip()):
        kind, _, n = label.partition("-")
        if kind not in ("ours", "pipe", "mlx_lm") or n not in ("1", "N") or label == "pipe-1":
            raise SystemExit(f"--configs: {label!r}; choose from ours-1, ours-N, pipe-N, "
                             "mlx_lm-N, mlx_lm-1")
        n_ranks = 1 if n == "1" else ranks
        name = f"{kind}-{n_ranks}"
        extra = ("--pipeline",) if kind == "pipe" else ()
        out.append((name, ServerConfig(name, "mlx_lm" if kind == "mlx_lm" else "slabserve",
                                       extra_args=extra), n_ranks))
    return out


def table(results, labels: list[str], kv: dict[str, int | None]) -> str:
    """Markdown: per cell, each configuration's tok/s, TTFT p50 and TPOT p50, then the
    ratio of each multi-rank configuration of ours (tensor, pipeline) to ours-1, and of
    ours-N to mlx_lm-N."""
    by: dict[tuple[int, int], dict[str, object]] = {}
    for r in results:
        by.setdefault((r.spec.context, r.spec.concurrency), {})[r.label] = r.summary
    multi = [lab for lab in labels if lab.startswith(("ours-", "pipe-")) and lab != "ours-1"]
    ours_n = next((lab for lab in multi if lab.startswith("ours-")), None)
    mlx_n = next((lab for lab in labels if lab.startswith("mlx_lm-") and lab != "mlx_lm-1"),
                 None)
    pairs = [(lab, "ours-1") for lab in multi] + ([(ours_n, mlx_n)] if ours_n and mlx_n else [])
    head = ["ctx", "conc"] + [f"{lab} tok/s" for lab in labels]
    head += [f"{lab} TTFT / TPOT p50 ms" for lab in labels]
    head += [f"{a} / {b} tok/s" for a, b in pairs]
    rows = ["| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
    for (ctx, conc), cell in sorted(by.items()):
        toks = [cell[lab].output_tok_s if lab in cell else float("nan") for lab in labels]
        lat = [f"{cell[lab].ttft.p50:.0f} / {cell[lab].tpot.p50:.0f}" if lab in cell else "-"
               for lab in labels]
        t = dict(zip(labels, toks, strict=True))
        ratio = [_ratio(t.get(a), t.get(b)) for a, b in pairs]
        rows.append("| " + " | ".join([str(ctx), str(conc)] + [f"{x:.2f}" for x in toks]
                                      + lat + ratio) + " |")
    pools = ", ".join(f"{lab} {n} tokens" for lab, n in kv.items() if n is not None)
    return "\n".join(rows) + f"\n\nKV pool at the same --kv-budget per rank: {pools}\n"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slabserve bench tensor-parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model directory")
    p.add_argument("--embedded", default="qwen2.5-0.5b:float32", help="NAME[:DTYPE]")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--configs", default="ours-1,ours-N,pipe-N,mlx_lm-N")
    p.add_argument("--contexts", default="512")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", default="2,4")
    p.add_argument("--kv-budget", default="1G", help="ours: KV pool bytes per rank")
    p.add_argument("--rank-env", action="append", default=None,
                   help="KEY=VALUE for every rank under mlx.launch (default "
                        "OPENBLAS_NUM_THREADS=1)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("out/tensor-parallel"))
    a = p.parse_args(argv)
    model = resolve_model(a)
    tok, eos = load_tokenizer(model), eos_token_ids(model)
    grid = GridSpec(tuple(parse_size(x) for x in a.contexts.split(",")),
                    tuple(int(x) for x in a.concurrency.split(",")), a.max_tokens,
                    tuple(int(x) for x in a.requests.split(",")), duration_s=900.0)
    prompts = build_prompts(grid, tok)
    rank_env = tuple(a.rank_env if a.rank_env is not None else ["OPENBLAS_NUM_THREADS=1"])
    configs = parse_configs(a.configs, a.ranks)
    results, kv = [], {}
    for label, cfg, ranks in configs:
        if cfg.kind == "slabserve":
            cfg = ServerConfig(label, "slabserve",
                               extra_args=(*cfg.extra_args, "--kv-budget", a.kv_budget))
        print(f"[{label}] starting ...", file=sys.stderr)
        with LaunchedServer(cfg, model, a.out / f"server-{label}.log", ranks, rank_env,
                            a.ready_timeout) as srv:
            kv[label] = srv.kv_tokens()
            results += run_grid(endpoint_for(srv, eos), grid, prompts, label, False)
    labels = [c[0] for c in configs]
    md = table(results, labels, kv)
    meta = {"command": "slabserve bench tensor-parallel " + " ".join(argv),
            "model": str(model), "machine": f"{platform.machine()} {platform.system()}, "
            f"{os.cpu_count()} CPUs", "kv_tokens": kv, "rank_env": rank_env}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "results.json", results, meta)
    (a.out / "results.md").write_text(md)
    print(md)
    print(json.dumps(meta, indent=1))
    return 0

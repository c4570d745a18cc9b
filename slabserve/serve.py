"""``slabserve serve``: flags and environment -> frozen configs (``ServerConfig``,
``ServeConfig``), build the serving loop, serve the app with uvicorn; SIGTERM/SIGINT
drain gracefully and exit 0.

Shutdown: the first signal stops admitting (new requests get 503 ``shutting_down``,
``/ready`` turns 503) and gives in-flight requests ``--shutdown-timeout`` seconds; the
serving loop then ends the rest (their streams get a last chunk with ``finish_reason: abort``
and ``[DONE]``), uvicorn closes the connections and the process exits 0.  A second
signal exits at once.

Under ``mlx.launch`` (an MLX distributed group of more than one rank) ``slabserve.ranks``
takes over once the configs are read: rank 0 serves as above, the other ranks follow its
steps (tensor parallel, or pipeline parallel with ``--pipeline``; docs/distributed.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

import uvicorn

from slabserve import env
from slabserve.engine.config import KV_DTYPES
from slabserve.server.config import TOOL_CALL_PARSERS, ServerConfig, model_aliases

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """Bytes from ``123``, ``512M``, ``2G``, ``1.5GiB``."""
    v = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SUFFIX.get(v[-1:], 1)
    try:
        n = float(v[:-1] if v[-1:] in _SUFFIX else v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 512M") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return int(n * mult)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slabserve serve",
                                description="OpenAI-compatible server (see README).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="local mlx-lm model directory or embedded:NAME; "
      "none = the embedded tiny model")
    a("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
      help="dtype of an embedded model")
    a("--served-model-name", nargs="+", default=None, help="model name reported and "
      "accepted (more names: aliases; the --model path is accepted too)")
    a("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSERS,
      help="tool-call format of the model's output; auto = from its chat template")
    a("--host", default="127.0.0.1", help="bind address (loopback by default)")
    a("--port", type=int, default=8000, help="TCP port")
    a("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
      "(or set SLABSERVE_API_KEY)")
    a("--max-body-bytes", type=size, default=ServerConfig.max_body_bytes,
      help="largest request body (e.g. 8M); 413 beyond")
    a("--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout,
      help="seconds in-flight requests may run after SIGTERM")
    a("--max-n", type=int, default=ServerConfig.max_n, help="most choices per request")
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    a("--admin-endpoints", action="store_true",
      help="serve /admin/attention-path (GET, POST {\"path\": \"auto|native|gather\"}) to "
      "switch decode attention at run time, for benchmarks; behind --api-key if one is set")
    a("--calibrate", action="store_true", help="time the decode-attention paths for this "
      "model at start-up (short grid), save and use the device profile")
    g = p.add_argument_group("across processes (under mlx.launch; docs/distributed.md)")
    g.add_argument("--pipeline", action="store_true", help="pipeline parallel instead of "
                   "tensor parallel: each rank holds a contiguous slice of the layers (llama, "
                   "mistral, qwen2, qwen3)")
    g.add_argument("--distributed-timeout", type=float, default=60.0,
                   help="seconds any rank waits on the others (a step, or rank 0's next "
                        "message) before the server ends, non-zero: a rank died or hangs")
    g = p.add_argument_group("KV cache")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--slab-tokens", type=int, default=None,
                   help="tokens per slab (default: the KV budget in at most 32 slabs, "
                        "at least 4096)")
    g.add_argument("--kv-budget", type=size, default=None,
                   help="KV pool bytes (e.g. 2G); default: on a GPU --kv-memory-fraction of "
                        "its memory less the weights and an activation reserve, on a CPU 1G")
    g.add_argument("--kv-memory-fraction", type=float, default=0.9,
                   help="on a GPU without --kv-budget: the share of device memory the "
                        "process may use (weights + activations + KV pool), like vLLM's "
                        "--gpu-memory-utilization")
    g.add_argument("--initial-slabs", type=int, default=1)
    g.add_argument("--kv-preallocate", action=argparse.BooleanOptionalAction, default=None,
                   help="allocate the whole KV pool at start-up, in one slab unless it is "
                        "too large (default: on a GPU, like vLLM; compiled decode steps then "
                        "never see the pool change); off: grow a slab at a time from "
                        "--initial-slabs")
    g.add_argument("--kv-dtype", default=None, choices=list(KV_DTYPES),
                   help="KV pool element type (default: the model's K/V dtype); int8: a float16 "
                        "scale per token and kv head (docs/benchmarks/kv-int8.md)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse cached full KV blocks of earlier prompts that "
                   "start with the same tokens (--no-enable-prefix-caching or "
                   "--no-prefix-caching turns it off)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--cache-limit", type=size, default=None, help="MLX buffer cache limit "
                   "(default SLABSERVE_MLX_CACHE_LIMIT, else a quarter of memory on CPU)")
    g = p.add_argument_group("scheduler")
    g.add_argument("--max-running", type=int, default=64)
    g.add_argument("--max-queued", type=int, default=256)
    g.add_argument("--max-step-tokens", type=int, default=None,
                   help="tokens per serving step (default 512 on CPU, 1024 for a model of "
                        "at most 250M parameters; on a GPU room for 8 prefill chunks "
                        "beside max-running decodes)")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="most prompt tokens of one sequence per step (default 256 on CPU, "
                        "512 for a model of at most 250M parameters; 2048 on a GPU)")
    g.add_argument("--prefill-align", type=int, default=None,
                   help="cut non-final prefill chunks to a multiple of this (default 1 on "
                        "CPU, the prefill chunk on a GPU: repeated shapes reuse CUDA "
                        "attention graphs)")
    g.add_argument("--max-context", type=int, default=None)
    g.add_argument("--prefill-kv-bucket", type=int, default=None,
                   help="pad prefill attention's kv length to a multiple of this many tokens "
                        "(fewer CUDA SDPA shapes); 0 = exact; default SLABSERVE_PREFILL_KV_BUCKET, "
                        "else 2048 on a CUDA GPU and 0 elsewhere")
    g.add_argument("--watermark-blocks", type=int, default=1)
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and submit each pure-decode step while the previous one runs, "
                        "its tokens fed on the device (default on a GPU; on CPU MLX computes "
                        "inside the submit, so there is nothing to overlap)")
    g.add_argument("--host-math", default=None, choices=["auto", "on", "off"],
                   help="float32 prefill softmax and SiLU in numpy on CPU (faster than MLX's "
                        "scalar exp); default SLABSERVE_HOST_MATH or auto (on where it applies)")
    g.add_argument("--linear-layout", default=None, choices=["auto", "on", "off"],
                   help="store float32 Linear weights transposed on CPU (faster few-row "
                        "decode products); default SLABSERVE_LINEAR_LAYOUT or auto (on where "
                        "it applies)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every decode layer's Python each step instead of its compiled "
                        "stages (engine/staged.py; compiled by default on a GPU, eager on "
                        "CPU)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="on a GPU, trace compiled decode steps for batches up to this size at "
                        "start-up (batch sizes 1, 2, 4, then multiples of 8, each also "
                        "padded), so no request waits on a trace or a kernel compile; 0 = "
                        "none (traced on first use); default --max-running")
    g.add_argument("--inplace-kv-writes", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, compiled decode steps and prefill chunks write K/V "
                        "into the pool's own buffers with a kernel (kvcache/inplace.py) "
                        "instead of MLX scatters, which copy every slab they write; "
                        "declines itself where its start-up probe fails")
    g.add_argument("--rows-matmul", action=argparse.BooleanOptionalAction, default=False,
                   help="on CUDA, compiled decode steps of 2-16 sequences run their "
                        "projections as a few-rows kernel (engine/rows_matmul.py) instead "
                        "of cuBLAS; declines itself where its start-up probe fails. "
                        "Off by default: on an H100 it saved host time but its device "
                        "time rose (steps 0.94x at 4 streams, 1.04x at 8)")
    g.add_argument("--dispatch-every", type=int, default=0,
                   help="start evaluating each forward every N layers while the rest is "
                        "built (overlaps host and device work); 0 = one evaluation per step")
    return p


def _gpu() -> bool:
    """Whether MLX computes on a GPU here (the per-device scheduler defaults)."""
    import mlx.core as mx

    return mx.default_device().type == mx.gpu


def _switch(choice: str | None, from_env: bool | None) -> bool:
    """A flag ``on``/``off`` wins; ``auto`` or no flag takes the environment's value, and
    unset there means on (the feature still applies only where it can)."""
    flag = {"on": True, "off": False}.get(choice or "auto")
    if flag is not None:
        return flag
    return from_env is not False


def configs(args: argparse.Namespace):
    """(ServerConfig, ServeConfig) from parsed flags and the environment (read here, once);
    ValueError when invalid."""
    from slabserve.build import ServeConfig
    from slabserve.engine.config import CacheConfig, RunnerConfig
    from slabserve.scheduler.config import SchedulerConfig

    served = args.served_model_name[0] if args.served_model_name else None
    server = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or env.api_key(),
        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
        served_model_name=served, max_n=args.max_n, log_level=args.log_level,
        admin_endpoints=args.admin_endpoints,
        model_aliases=model_aliases(args.model, args.served_model_name or ()),
        tool_call_parser=args.tool_call_parser)
    cache = CacheConfig(block_size=args.block_size, slab_tokens=args.slab_tokens,
                        kv_budget_bytes=args.kv_budget or CacheConfig.kv_budget_bytes,
                        initial_slabs=args.initial_slabs,
                        dtype=args.kv_dtype, prefix_caching=args.enable_prefix_caching,
                        preallocate=_gpu() and not args.enforce_eager
                        if args.kv_preallocate is None else args.kv_preallocate)
    sched = SchedulerConfig.for_device(
        _gpu(), max_running=args.max_running, max_queued=args.max_queued,
        max_step_tokens=args.max_step_tokens, prefill_chunk=args.prefill_chunk,
        prefill_align=args.prefill_align, max_context=args.max_context,
        watermark_blocks=args.watermark_blocks, async_scheduling=args.async_scheduling)
    bucket = args.prefill_kv_bucket
    runner = RunnerConfig(
        prefill_kv_bucket=env.prefill_kv_bucket() if bucket is None else bucket,
        dispatch_every=args.dispatch_every,
        host_math=_switch(args.host_math, env.host_math()),
        linear_layout=_switch(args.linear_layout, env.linear_layout()),
        compile_decode=_gpu() and not args.enforce_eager,
        rows_matmul=args.rows_matmul, inplace_kv_writes=args.inplace_kv_writes,
        capture_max_batch=args.max_running if args.cuda_graph_max_bs is None
        else args.cuda_graph_max_bs)
    limit = env.mlx_cache_limit() if args.cache_limit is None else args.cache_limit
    serving = ServeConfig(model=args.model, dtype=args.dtype, cache_dir=env.cache_dir(),
                          cache=cache, runner=runner, scheduler=sched,
                          mlx_cache_limit_bytes=limit, served_name=served,
                          kv_memory_fraction=None if args.kv_budget else args.kv_memory_fraction)
    return server, serving


def make_selector():
    """The decode-path selector from the environment: override
    (``SLABSERVE_PAGED_ATTENTION_NATIVE``), trace path, and this device's profile."""
    from slabserve.attention import Selector
    from slabserve.attention.profile import load_for_device

    return Selector(env.paged_attention_native(), load_for_device(env.cache_dir()),
                    env.attention_trace_path())


class DrainingServer(uvicorn.Server):
    """uvicorn's server with our signal handling: drain the app, then exit (uvicorn's own
    handler would re-raise SIGTERM after shutdown, ending the process with -15)."""

    def __init__(self, config: uvicorn.Config, ctx) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signalled = False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_signal(self, sig: int, frame) -> None:
        if self.signalled or self.loop is None or not self.started:
            self.should_exit = True
            self.force_exit = self.signalled
            return
        self.signalled = True
        self.loop.call_soon_threadsafe(self._drain_then_exit)

    def _drain_then_exit(self) -> None:
        task = self.ctx.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def calibrate(serve_cfg, serving) -> None:
    """``--calibrate``: the short attention grid for the served model's geometry, merged
    into this device's profile and installed in the runner's selector."""
    from slabserve.attention.calibrate import calibrate_startup
    from slabserve.calibrate import model_geometry

    q_heads = model_geometry(serve_cfg.model, serve_cfg.dtype)[0]
    log = logging.getLogger("slabserve.calibrate")
    log.info("calibrating decode attention (short grid)...")
    runner = serving.executor.runner
    calibrate_startup(q_heads, runner.geom, serve_cfg.cache_dir, runner.attention.selector,
                      log=log.info)


PIPELINE_ALONE = (
    "--pipeline splits the model's layers over the ranks of mlx.launch, and this process is "
    "alone: start it under `mlx.launch -n N`, or drop --pipeline")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        server_cfg, serve_cfg = configs(args)
    except ValueError as e:
        print(f"slabserve serve: {e}", file=sys.stderr)
        return 2
    import mlx.core as mx

    group = mx.distributed.init()
    rank = f"[rank {group.rank()}/{group.size()}] " if group.size() > 1 else ""
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(levelname)s {rank}%(name)s: %(message)s")
    public = server_cfg.host not in ("127.0.0.1", "localhost", "::1")
    if public and not server_cfg.api_key and group.rank() == 0:
        logging.getLogger("slabserve.server").warning(
            "binding %s without an API key: anyone who can reach it can use it "
            "(set --api-key or SLABSERVE_API_KEY)", server_cfg.host)
    if group.size() > 1:
        from slabserve import ranks

        return ranks.serve_rank(group, args, server_cfg, serve_cfg, make_selector(), serve_http)
    if args.pipeline:
        print(f"slabserve serve: {PIPELINE_ALONE}", file=sys.stderr)
        return 2
    from slabserve.build import build_serving

    serving = build_serving(serve_cfg, make_selector())
    if args.calibrate:
        calibrate(serve_cfg, serving)
    return serve_http(serving, server_cfg)


def serve_http(serving, server_cfg: ServerConfig) -> int:
    """Serve the OpenAI app around ``serving`` until a signal drains it; 0 when it ran."""
    from slabserve.server.app import create_app

    app = create_app(serving, server_cfg)
    config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port,
                            log_level=server_cfg.log_level, lifespan="on",
                            timeout_graceful_shutdown=int(server_cfg.shutdown_timeout) + 10)
    server = DrainingServer(config, app.state.ctx)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

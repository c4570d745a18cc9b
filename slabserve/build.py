"""The composition root: build the model runner, the scheduler and the serving loop from
one frozen ``ServeConfig``.

``slabserve serve`` (slabserve/serve.py) reads flags and the environment into configs,
calls ``build_serving(cfg)``, hands the loop to ``server.app.create_app`` and starts it.
Layers below (server -> scheduler -> engine -> attention -> kvcache) never read settings
themselves; everything they need arrives here, as frozen configs or built objects.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slabserve import env
from slabserve.attention import Selector
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.loop import ThreadedServingLoop

if TYPE_CHECKING:
    from slabserve.engine.distributed import DistConfig, Follower, Leader

_DTYPES = ("float32", "float16", "bfloat16")
log = logging.getLogger("slabserve.build")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one served model needs, built at the edge (CLI, tests).

    ``model``: None = the embedded tiny model, ``embedded:NAME`` an embedded shape, else
    a local mlx-lm model directory.  ``dtype`` applies to embedded models (a local
    directory keeps its own).  ``cache_dir``: where embedded models are written
    (``SLABSERVE_CACHE_DIR``).
    ``mlx_cache_limit_bytes``: MLX buffer cache limit (None = ``slabserve.mlxmem``'s
    default).  ``served_name`` overrides the model name reported.  ``kv_memory_fraction``:
    on a GPU, size the KV pool from the device (``slabserve.mlxmem.device_kv_budget``)
    instead of ``cache.kv_budget_bytes``; None keeps the configured budget."""

    model: str | None = None
    dtype: str = "float32"
    cache_dir: Path = field(default_factory=env.cache_dir)
    cache: CacheConfig = field(default_factory=CacheConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mlx_cache_limit_bytes: int | None = None
    served_name: str | None = None
    kv_memory_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}")
        if self.mlx_cache_limit_bytes is not None and self.mlx_cache_limit_bytes < 0:
            raise ValueError("mlx_cache_limit_bytes must be >= 0")
        f = self.kv_memory_fraction
        if f is not None and not 0 < f <= 1:
            raise ValueError("kv_memory_fraction must be in (0, 1]")


def model_name(cfg: ServeConfig) -> str:
    if cfg.served_name:
        return cfg.served_name
    if cfg.model is None:
        return "tiny"
    if cfg.model.startswith("embedded:"):
        return cfg.model.split(":", 1)[1]
    return Path(cfg.model).expanduser().name


def model_context(model, tokenizer) -> int:
    """The model's context length: ``max_position_embeddings`` when the config has it,
    else the tokenizer's ``model_max_length``, else 4096."""
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 1 << 24 else 4096


def serving_context(model, tokenizer, sched_cfg: SchedulerConfig) -> int:
    """The longest sequence served: the model's context, capped by the scheduler's."""
    n = model_context(model, tokenizer)
    return n if sched_cfg.max_context is None else min(n, sched_cfg.max_context)


def build_serving(cfg: ServeConfig, selector: Selector | None = None) -> ThreadedServingLoop:
    """Load and assemble (not started: ``await loop.start()``).  ``selector``: the decode
    path selector (override, profile, trace; default auto without a profile)."""
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner
    from slabserve.mlxmem import configure_memory

    configure_memory(cfg.mlx_cache_limit_bytes)
    model, tokenizer, _path = load(cfg.model, cfg.dtype, cache_dir=cfg.cache_dir)
    cfg = for_model(cfg, model)
    runner_cfg = dataclasses.replace(
        cfg.runner, max_context=serving_context(model, tokenizer, cfg.scheduler))
    runner = ModelRunner(model, kv_cache_config(cfg, model), runner_cfg, selector)
    _log_pool(runner)
    return assemble(runner, tokenizer, cfg.scheduler, model_name(cfg),
                    cfg.runner.capture_max_batch)


def parameter_count(model) -> int:
    """The model's parameters, a quantized layer's packed weight counted as the values
    it holds (its scales and biases not at all)."""
    import mlx.core as mx
    import mlx.nn as nn

    total = 0
    for _, module in model.named_modules():
        bits = (module.bits if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                else None)
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            if bits is None:
                total += value.size
            elif name == "weight":
                total += value.size * 32 // bits
    return total


def for_model(cfg: ServeConfig, model) -> ServeConfig:
    """``cfg`` with its scheduler sized to the loaded ``model`` (``SchedulerConfig
    .for_model``: step sizes by parameter count where they were left to the defaults)."""
    params = parameter_count(model)
    sched = cfg.scheduler.for_model(params)
    if sched is not cfg.scheduler:
        log.info("scheduler: %d-token steps, %d-token prefill chunks for a model of %.1fM "
                 "parameters", sched.max_step_tokens, sched.prefill_chunk, params / 1e6)
    return dataclasses.replace(cfg, scheduler=sched)


@dataclass
class RankRole:
    """What one rank of a multi-rank server runs (``build_sharded``): rank 0 the
    serving loop, whose runner sends every step to the others through ``leader``; every
    other rank a ``follower`` that runs those steps on its shard until ``leader.stop()``."""

    rank: int
    loop: ThreadedServingLoop | None = None
    leader: Leader | None = None
    follower: Follower | None = None


def build_sharded(cfg: ServeConfig, group, dist: DistConfig, on_fault,
                  selector: Selector | None = None, pipeline: bool = False) -> RankRole:
    """This rank's part of one server over ``group`` (an ``mx.distributed`` group of more
    than one rank; every rank calls this with the same ``cfg``): tensor parallel, or
    pipeline parallel with ``pipeline`` (engine/pipeline.py).  ``on_fault(reason)`` is
    called when the group fails (a rank died or hangs): the caller ends the process.
    Rank 0's heartbeats start here, so followers wait on a live rank 0 from now on."""
    from slabserve.engine.distributed import Follower, Leader, ShardedRunner, agree_min
    from slabserve.engine.loader import load_sharded
    from slabserve.mlxmem import configure_memory

    configure_memory(cfg.mlx_cache_limit_bytes)
    model, tokenizer, _path = load_sharded(cfg.model, cfg.dtype, cache_dir=cfg.cache_dir,
                                           group=group, pipeline=pipeline)
    cfg = for_model(cfg, model)  # this rank's shard: its cost per token
    cache = kv_cache_config(cfg, model)
    budget = agree_min(group, cache.kv_budget_bytes)
    if pipeline:  # every rank's pool gets the same blocks, each for its own layers
        budget = budget // model.split.most * len(model.layers)
    cache = dataclasses.replace(cache, kv_budget_bytes=budget)
    rank = group.rank()
    leader = Leader(group, dist, on_fault) if rank == 0 else None
    runner = ShardedRunner(model, cache, cfg.runner, selector, group, leader, pipeline)
    _log_pool(runner, f"rank {rank}/{group.size()}: ")
    if leader is None:
        return RankRole(rank, follower=Follower(runner, group, dist, on_fault))
    leader.start()
    return RankRole(rank, assemble(runner, tokenizer, cfg.scheduler, model_name(cfg)), leader)


def _log_pool(runner, prefix: str = "") -> None:
    g = runner.geom
    log.info("%sKV pool: %d tokens (%d blocks of %d, %d layers, %d KV heads, %.2f GiB, %s, "
             "slabs of %d blocks)", prefix, runner.allocator.max_blocks * g.block_size,
             runner.allocator.max_blocks, g.block_size, g.num_layers, g.kv_heads,
             runner.allocator.max_blocks * g.block_bytes / 2**30,
             str(g.dtype).rsplit(".", 1)[-1], g.slab_blocks)


def kv_cache_config(cfg: ServeConfig, model) -> CacheConfig:
    """``cfg.cache``, with its budget sized from the device when ``kv_memory_fraction``
    is set and MLX computes on a GPU (the weights are loaded: what is in use now counts as
    weights)."""
    import mlx.core as mx

    from slabserve.mlxmem import activation_reserve_bytes, device_kv_budget

    if cfg.kv_memory_fraction is None:
        return cfg.cache
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", 4096)
    inter = getattr(args, "intermediate_size", 4 * hidden)
    reserve = activation_reserve_bytes(cfg.scheduler.max_step_tokens, hidden, inter, 4)
    budget = device_kv_budget(cfg.kv_memory_fraction, mx.get_active_memory(), reserve)
    if budget is None:
        return cfg.cache
    if budget <= 0:
        raise ValueError("no device memory left for the KV pool after the weights and "
                         "activations: lower the load or pass --kv-budget")
    return dataclasses.replace(cfg.cache, kv_budget_bytes=budget)


def assemble(runner, tokenizer, sched_cfg: SchedulerConfig, name: str,
             capture_max_batch: int = 0) -> ThreadedServingLoop:
    """Scheduler + executor + loop around an existing ``ModelRunner`` (whose blocks must
    all be free); benchmarks use it to try scheduler settings on one loaded model.
    ``capture_max_batch``: the loop's engine thread captures compiled decode steps for
    batches up to this size before serving (``capture_sizes``; 0 = none)."""
    from slabserve.engine.executor import ModelExecutor
    from slabserve.engine.step_graph import capture_sizes
    from slabserve.scheduler.scheduler import Scheduler

    max_context = serving_context(runner.model, tokenizer, sched_cfg)
    sizes = tuple(capture_sizes(capture_max_batch)) if capture_max_batch else ()
    executor = ModelExecutor(runner, max_context, sizes)
    scheduler = Scheduler(sched_cfg, runner.allocator, runner.block_size, max_context,
                          tokenizer.eos_token_ids)
    return ThreadedServingLoop(scheduler, executor, tokenizer, name)

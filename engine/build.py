"""Build the serving engine from one frozen config: load the model, make the paged
runner, the executor, the scheduler and the asyncio front.

The HTTP server calls ``build_engine(EngineConfig(...))`` then ``await engine.start()``;
``engine.tokenizer`` (mlx-lm ``TokenizerWrapper``: chat template, encode, detokenizer),
``engine.model_name`` and ``engine.max_context`` are what it needs besides
``scheduler.api.AsyncEngine``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.engine import AsyncLLMEngine

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built at the edge (CLI, tests).

    ``model``: None = the embedded tiny model, ``embedded:NAME`` an embedded shape, else
    a local mlx-lm model directory.  ``dtype`` applies to embedded models (a local
    directory keeps its own).  ``cache_limit_bytes``: MLX buffer cache limit (None =
    ``slabserve.mlxmem`` default).  ``served_name`` overrides the model name reported."""

    model: str | None = None
    dtype: str = "float32"
    cache: CacheConfig = field(default_factory=CacheConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_limit_bytes: int | None = None
    served_name: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}")
        if self.cache_limit_bytes is not None and self.cache_limit_bytes < 0:
            raise ValueError("cache_limit_bytes must be >= 0")


def model_name(cfg: EngineConfig) -> str:
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


def build_engine(cfg: EngineConfig) -> AsyncLLMEngine:
    """Load and assemble (not started: ``await engine.start()``)."""
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner

    from slabserve.mlxmem import configure_memory

    configure_memory(cfg.cache_limit_bytes)
    model, tokenizer, _path = load(cfg.model, cfg.dtype)
    runner = ModelRunner(model, cfg.cache, cfg.runner.prefill_kv_bucket, cfg.runner.host_math,
                         cfg.runner.linear_layout)
    runner.dispatch_every = cfg.runner.dispatch_every
    chunk = min(cfg.scheduler.prefill_chunk, cfg.runner.prefill_chunk)
    sched_cfg = dataclasses.replace(cfg.scheduler, prefill_chunk=chunk)
    return assemble(runner, tokenizer, sched_cfg, model_name(cfg))


def assemble(runner, tokenizer, sched_cfg: SchedulerConfig, name: str) -> AsyncLLMEngine:
    """Scheduler + executor + front around an existing ``ModelRunner`` (whose blocks must
    all be free); benchmarks use it to try scheduler settings on one loaded model."""
    from slabserve.engine.executor import ModelExecutor
    from slabserve.scheduler.scheduler import Scheduler

    max_context = model_context(runner.model, tokenizer)
    if sched_cfg.max_context is not None:
        max_context = min(max_context, sched_cfg.max_context)
    executor = ModelExecutor(runner, max_context)
    scheduler = Scheduler(sched_cfg, runner.allocator, runner.block_size, max_context,
                          tokenizer.eos_token_ids)
    return AsyncLLMEngine(scheduler, executor, tokenizer, name)

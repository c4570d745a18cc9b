"""The composition root: build the model runner, the scheduler and the serving loop from
one frozen ``ServeConfig``.

``slabserve serve`` (slabserve/serve.py) reads flags and the environment into configs,
calls ``build_serving(cfg)``, hands the loop to ``server.app.create_app`` and starts it.
Layers below (server -> scheduler -> engine -> attention -> kvcache) never read settings
themselves; everything they need arrives here, as frozen configs or built objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slabserve import env
from slabserve.attention import Selector
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.scheduler.config import SchedulerConfig
from slabserve.scheduler.loop import ThreadedServingLoop

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one served model needs, built at the edge (CLI, tests).

    ``model``: None = the embedded tiny model, ``embedded:NAME`` an embedded shape, else
    a local mlx-lm model directory.  ``dtype`` applies to embedded models (a local
    directory keeps its own).  ``cache_dir``: where embedded models are written
    (``SLABSERVE_CACHE_DIR``).
    ``mlx_cache_limit_bytes``: MLX buffer cache limit (None = ``slabserve.mlxmem``'s
    default).  ``served_name`` overrides the model name reported."""

    model: str | None = None
    dtype: str = "float32"
    cache_dir: Path = field(default_factory=env.cache_dir)
    cache: CacheConfig = field(default_factory=CacheConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mlx_cache_limit_bytes: int | None = None
    served_name: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}")
        if self.mlx_cache_limit_bytes is not None and self.mlx_cache_limit_bytes < 0:
            raise ValueError("mlx_cache_limit_bytes must be >= 0")


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


def build_serving(cfg: ServeConfig, selector: Selector | None = None) -> ThreadedServingLoop:
    """Load and assemble (not started: ``await loop.start()``).  ``selector``: the decode
    path selector (override, profile, trace; default auto without a profile)."""
    from slabserve.engine.loader import load
    from slabserve.engine.runner import ModelRunner
    from slabserve.mlxmem import configure_memory

    configure_memory(cfg.mlx_cache_limit_bytes)
    model, tokenizer, _path = load(cfg.model, cfg.dtype, cache_dir=cfg.cache_dir)
    runner = ModelRunner(model, cfg.cache, cfg.runner, selector)
    return assemble(runner, tokenizer, cfg.scheduler, model_name(cfg))


def assemble(runner, tokenizer, sched_cfg: SchedulerConfig, name: str) -> ThreadedServingLoop:
    """Scheduler + executor + loop around an existing ``ModelRunner`` (whose blocks must
    all be free); benchmarks use it to try scheduler settings on one loaded model."""
    from slabserve.engine.executor import ModelExecutor
    from slabserve.scheduler.scheduler import Scheduler

    max_context = model_context(runner.model, tokenizer)
    if sched_cfg.max_context is not None:
        max_context = min(max_context, sched_cfg.max_context)
    executor = ModelExecutor(runner, max_context)
    scheduler = Scheduler(sched_cfg, runner.allocator, runner.block_size, max_context,
                          tokenizer.eos_token_ids)
    return ThreadedServingLoop(scheduler, executor, tokenizer, name)

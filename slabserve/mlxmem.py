"""MLX's buffer cache limit (issue 8).

MLX keeps freed buffers for reuse up to a cache limit.  On the CPU backend that limit
defaults to 32 MiB, so any larger intermediate (a gathered K/V block, a prefill
activation) is returned to the OS and page-faulted back on every call: a paged-decode
gather ran ~7x slower for it (../shared/measurements/mlx-cpu-attention.md).  GPU backends
already default to their memory limit and are left alone unless a limit is given.

The cache only holds memory the engine's working set has actually used once; the limit is
a ceiling on what is *kept*, not an allocation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FRACTION = 0.25  # of usable host memory (cgroup limit included)


@dataclass(frozen=True)
class MemorySettings:
    """The cache limit now in force, the one before, and where the value came from
    ('explicit', 'default' or 'unchanged' for GPU backends without an explicit value)."""

    cache_limit_bytes: int
    previous_bytes: int
    source: str


def host_memory_bytes() -> int:
    """Physical memory, capped by a cgroup v2/v1 memory limit when one is set."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


def default_cache_limit(memory_bytes: int | None = None, fraction: float = DEFAULT_FRACTION) -> int:
    """``fraction`` of ``memory_bytes`` (default: host memory), rounded down to MiB."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    mem = host_memory_bytes() if memory_bytes is None else memory_bytes
    return int(mem * fraction) >> 20 << 20


def configure_memory(cache_limit_bytes: int | None = None) -> MemorySettings:
    """Set MLX's buffer cache limit and return what was set.

    ``None``: on the CPU device, ``DEFAULT_FRACTION`` of host memory, never above MLX's
    memory limit; on a GPU device MLX's own default (its memory limit) is kept.  An
    explicit value (``0`` disables the cache) is applied as given on any device.
    Call once at engine build time, before the first forward."""
    import mlx.core as mx

    if cache_limit_bytes is not None:
        if cache_limit_bytes < 0:
            raise ValueError("cache_limit_bytes must be >= 0")
        prev = mx.set_cache_limit(int(cache_limit_bytes))
        return MemorySettings(int(cache_limit_bytes), prev, "explicit")
    if mx.default_device().type != mx.cpu:
        prev = mx.set_cache_limit(mx.get_memory_limit())  # read it back unchanged
        mx.set_cache_limit(prev)
        return MemorySettings(prev, prev, "unchanged")
    limit = min(default_cache_limit(), mx.get_memory_limit())
    prev = mx.set_cache_limit(limit)
    return MemorySettings(limit, prev, "default")


def device_memory_bytes() -> int | None:
    """Memory the default GPU device offers this process (Metal's recommended working set,
    CUDA's total memory, capped by MLX's memory limit); None on the CPU."""
    import mlx.core as mx

    if mx.default_device().type == mx.cpu:
        return None
    info = mx.device_info()
    total = next((int(info[k]) for k in ("max_recommended_working_set_size", "total_memory",
                                         "memory_size") if info.get(k)), 0)
    limit = mx.get_memory_limit()
    return min(total, limit) if total and limit else (total or limit or None)


def activation_reserve_bytes(step_tokens: int, hidden: int, intermediate: int,
                             itemsize: int) -> int:
    """Memory kept free for one step's activations: the widest layer's inputs and outputs
    (hidden states, the MLP's gate / up / product) for ``step_tokens`` tokens, doubled for
    the graph's temporaries, plus 512 MiB for the framework."""
    per_token = (4 * hidden + 3 * intermediate) * itemsize
    return 2 * step_tokens * per_token + (512 << 20)


def device_kv_budget(fraction: float, weights_bytes: int, reserve_bytes: int) -> int | None:
    """The KV pool's byte budget sized from the device, as vLLM's
    ``gpu_memory_utilization``: ``fraction`` of the device memory, less the weights and
    the activation reserve.  None on the CPU (the caller keeps its bounded default)."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    total = device_memory_bytes()
    if total is None:
        return None
    return max(0, int(total * fraction) - weights_bytes - reserve_bytes)

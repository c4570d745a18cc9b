"""MLX's CUDA graph budget: graphs end by op count, not by the sizes of their inputs.

MLX's CUDA backend records a stream's kernels into a CUDA graph and launches that graph once
it holds more than ``MLX_MAX_OPS_PER_BUFFER`` ops (100 on an H100) or once the inputs it
recorded pass ``MLX_MAX_MB_PER_BUFFER`` "MB" (1000 on an H100). That second count adds the
element count of every input of every op, again for each op that reads it. A decode step's
attention kernel and in-place K/V writer take a layer's whole slabs as inputs. With the
pool sized from the device, each slab is up to 2^30 elements, so every such launch ended a
graph and one step paid for dozens of graph launches. How many depended on the pool's size
(docs/adr/0015-cuda-graph-budget.md).

MLX reads both variables once, when it builds a stream's encoder (as ``mlx.core`` is
imported), so this runs before that import. It does so on Linux only: there MLX computes on
CUDA or on the CPU, whose backend does not read the variable. On macOS, Metal counts a
command buffer's distinct input buffers instead and is left alone (unverified here).
"""

from __future__ import annotations

UNBOUNDED_MB = 1 << 30
"""Larger than any count a process can reach (MLX compares ``count >> 20`` with it, as an
``int``)."""


def graph_env(current_mb: str | None, platform: str) -> dict[str, str]:
    """The variables to set before MLX is imported: ``MLX_MAX_MB_PER_BUFFER`` unbounded on
    Linux unless the user set it (then theirs stands, e.g. ``1000`` for MLX's own H100
    budget); nothing elsewhere."""
    if current_mb is not None or not platform.startswith("linux"):
        return {}
    return {"MLX_MAX_MB_PER_BUFFER": str(UNBOUNDED_MB)}

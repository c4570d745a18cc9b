"""A waited step's device time on CUDA, from CUPTI's kernel records (PyTorch's profiler).

MLX 0.32.4 has no GPU timer.  CUPTI records every kernel the process runs, MLX's included
(captured CUDA graphs' kernels as well), with device timestamps, and PyTorch's profiler
turns that on.  ``measure(step, n)`` runs ``step(i)`` for ``i < n`` under it, each call
inside its own annotated range; a step must wait for its own kernels before returning
(``ModelExecutor.execute`` does: it reads the sampled tokens), so every kernel that starts
inside a range belongs to that step.  Per step it reports:

- ``busy``: the kernels' summed durations (the device computing);
- ``span``: the first kernel's start to the last one's end (``busy`` plus the gaps in
  which the device waited for the host to launch more).

``reason()`` says why it cannot run here (no PyTorch, no CUDA device): the benchmarks then
leave the device phase out.  Profiling slows the host, so steps measured here are not the
ones whose host phases a benchmark reports.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARK = "slabserve-step"


@dataclass(frozen=True)
class StepKernels:
    """One step's kernels on the device: how many, busy and span in microseconds."""

    kernels: int
    busy_us: float
    span_us: float


def reason() -> str | None:
    """Why device time cannot be measured in this process, or None when it can."""
    try:
        import torch
    except ImportError:
        return "needs PyTorch (its profiler reads CUPTI)"
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return None


def measure(step, n: int) -> list[StepKernels]:
    """``step(i)`` for ``i`` in ``range(n)`` under the profiler; each step's kernels."""
    return split_steps(trace(step, n))


def trace(step, n: int) -> list[dict]:
    """The Chrome trace events of ``step(i)`` for ``i`` in ``range(n)`` under the profiler,
    each call inside a ``MARK`` range."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            with record_function(f"{MARK}{i}"):
                step(i)
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())["traceEvents"]


def kernels_by_step(events: list[dict]) -> list[list[tuple[float, float, str]]]:
    """Per ``MARK`` range of a Chrome trace's events, in time order, the (start, duration,
    name) of its kernels: a kernel belongs to the range its start falls in."""
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("ph") == "X" and str(e.get("name", "")).startswith(MARK)
                   and e.get("cat") == "user_annotation")
    kernels = sorted((e["ts"], e["dur"], str(e.get("name", ""))) for e in events
                     if e.get("ph") == "X" and e.get("cat") == "kernel")
    return [[k for k in kernels if t0 <= k[0] <= t1] for t0, t1 in marks]


def summarize(kernels: list[tuple[float, float, str]]) -> StepKernels:
    """One step's count, busy and span from its kernels; all zero without any."""
    if not kernels:
        return StepKernels(0, 0.0, 0.0)
    end = max(ts + dur for ts, dur, _ in kernels)
    first = min(ts for ts, _, _ in kernels)
    return StepKernels(len(kernels), float(sum(d for _, d, _ in kernels)), float(end - first))


def split_steps(events: list[dict]) -> list[StepKernels]:
    """Each ``MARK`` range's kernels (``kernels_by_step``), summarized."""
    return [summarize(k) for k in kernels_by_step(events)]

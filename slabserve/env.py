"""Every environment variable slabserve reads, typed, in one place (prefix SLABSERVE_).

Read through these functions at the edge (CLI, engine set-up), never scattered.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def _tristate(raw: str | None) -> bool | None:
    if raw is None:
        return None
    v = raw.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def cache_dir() -> Path:
    """SLABSERVE_CACHE_DIR: where embedded models and calibration profiles live
    (default ``~/.cache/slabserve``)."""
    raw = os.environ.get("SLABSERVE_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "slabserve"


def paged_attention_native() -> bool | None:
    """SLABSERVE_PAGED_ATTENTION_NATIVE (or, when unset, MLXCEL_PAGED_ATTENTION_NATIVE):
    True forces the native pooled path, False forces gather-SDPA, None = auto."""
    raw = os.environ.get("SLABSERVE_PAGED_ATTENTION_NATIVE")
    if raw is None:
        raw = os.environ.get("MLXCEL_PAGED_ATTENTION_NATIVE")
    return _tristate(raw)


def openblas_disabled() -> bool:
    """SLABSERVE_NO_OPENBLAS=1: do not preload OpenBLAS for MLX's CPU backend."""
    return _tristate(os.environ.get("SLABSERVE_NO_OPENBLAS")) is True


def attention_trace_path() -> Path | None:
    """SLABSERVE_ATTENTION_TRACE: write one JSONL line per decode step and layer there."""
    raw = os.environ.get("SLABSERVE_ATTENTION_TRACE")
    return Path(raw) if raw else None


# ---- BLAS preload and MLX memory (issue 8) -----------------------------------------------
BLAS_REEXEC_MARKER = "SLABSERVE_BLAS_REEXEC"
"""Set by ``slabserve.blas`` to the pid that re-executed itself with LD_PRELOAD (exec keeps
the pid, so a re-executed process knows it must not try again; children have other pids)."""


def blas_reexec_marker() -> str | None:
    """SLABSERVE_BLAS_REEXEC: internal loop guard of the OpenBLAS launcher (a pid)."""
    return os.environ.get(BLAS_REEXEC_MARKER)


def openblas_library() -> Path | None:
    """SLABSERVE_OPENBLAS: path of the OpenBLAS library to preload (overrides the search)."""
    raw = os.environ.get("SLABSERVE_OPENBLAS")
    return Path(raw).expanduser() if raw else None


_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def mlx_cache_limit() -> int | None:
    """SLABSERVE_MLX_CACHE_LIMIT: MLX buffer cache limit in bytes (suffixes K/M/G/T, or
    ``0`` to disable the cache); None = default (a fraction of memory, see slabserve.mlxmem)."""
    raw = os.environ.get("SLABSERVE_MLX_CACHE_LIMIT")
    if raw is None or not raw.strip():
        return None
    v = raw.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = v[-1] if v and v[-1] in _SIZE_SUFFIX else ""
    try:
        n = float(v[: len(v) - len(suffix)])
    except ValueError:
        raise ValueError(f"SLABSERVE_MLX_CACHE_LIMIT={raw!r}: expected bytes like 8G") from None
    if n < 0:
        raise ValueError(f"SLABSERVE_MLX_CACHE_LIMIT={raw!r} must not be negative")
    return int(n * _SIZE_SUFFIX[suffix])


def mlx_max_mb_per_buffer() -> str | None:
    """MLX_MAX_MB_PER_BUFFER, MLX's own variable, as the user set it (None = unset; then
    slabserve sets it on Linux before MLX is imported, slabserve.mlxgraphs)."""
    return os.environ.get("MLX_MAX_MB_PER_BUFFER")


def api_key() -> str | None:
    """SLABSERVE_API_KEY: the Bearer key ``slabserve serve`` requires on ``/v1/*`` when
    ``--api-key`` is not given (keeps the key out of the process list); unset = none."""
    raw = os.environ.get("SLABSERVE_API_KEY")
    return raw if raw else None


# ---- prefill shape buckets (prefill-chunk latency on CUDA) --------------------------------
def prefill_kv_bucket() -> int | None:
    """SLABSERVE_PREFILL_KV_BUCKET: round prefill attention's kv length up to a multiple of
    this many tokens (and q to a few fixed lengths) so MLX's CUDA SDPA sees a bounded set
    of shapes (attention/prefill.py); 0 = exact shapes; unset = None (the per-device
    default of ``attention.prefill.kv_bucket``)."""
    raw = os.environ.get("SLABSERVE_PREFILL_KV_BUCKET")
    if raw is None or not raw.strip():
        return None
    try:
        n = int(raw.strip())
    except ValueError:
        msg = f"SLABSERVE_PREFILL_KV_BUCKET={raw!r}: expected tokens, e.g. 1024"
        raise ValueError(msg) from None
    if n < 0:
        raise ValueError(f"SLABSERVE_PREFILL_KV_BUCKET={raw!r} must not be negative")
    return n


def _on_off_auto(name: str) -> bool | None:
    """An ``on``/``off``/``auto`` switch: True / False, None for auto or unset; anything
    else is a ValueError naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw.strip().lower() in ("", "auto"):
        return None
    value = _tristate(raw)
    if value is None:
        raise ValueError(f"{name}={raw!r}: expected on, off or auto")
    return value


# ---- numpy softmax / SiLU on CPU (attention/host_math.py) ---------------------------------
def host_math() -> bool | None:
    """SLABSERVE_HOST_MATH: ``on``/``off``/``auto`` (unset = auto).  Whether float32 prefill
    on CPU runs its softmax and SiLU in numpy (attention/host_math.py); None = auto, which
    is on wherever the host path applies (float32, CPU)."""
    return _on_off_auto("SLABSERVE_HOST_MATH")


# ---- float32 Linear weights stored transposed on CPU (engine/linear_layout.py) -------------
def linear_layout() -> bool | None:
    """SLABSERVE_LINEAR_LAYOUT: ``on``/``off``/``auto`` (unset = auto).  Whether float32
    ``nn.Linear`` / ``nn.Embedding`` weights are stored transposed on CPU for faster
    few-row products (engine/linear_layout.py); None = auto, which is on wherever it
    applies (float32, CPU)."""
    return _on_off_auto("SLABSERVE_LINEAR_LAYOUT")

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

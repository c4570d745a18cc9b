"""Attention over the slab pool: decode paths behind one entry, and prefill.

``decode_attention`` goes through the process's selector (attention/selector.py), built
on first use from the environment (override, trace path) and this device's calibration
profile, if any.  ``set_selector`` replaces it (server start-up after ``--calibrate``,
tests, benchmarks).
"""

from __future__ import annotations

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.attention.gather import GatherSDPA
from slabserve.attention.prefill import prefill_attention
from slabserve.attention.selector import Decision, Path, Reason, Selector

_SELECTOR: Selector | None = None


def default_selector() -> Selector:
    """The process's selector, created on first use."""
    global _SELECTOR
    if _SELECTOR is None:
        _SELECTOR = Selector.from_env()
    return _SELECTOR


def set_selector(selector: Selector | None) -> Selector | None:
    """Install ``selector`` (None: rebuild from the environment on next use); returns
    the previous one."""
    global _SELECTOR
    old, _SELECTOR = _SELECTOR, selector
    return old


def decode_attention(q, pool, layer: int, batch: DecodeBatch, scale: float):
    """The one decode entry: attention of ``q`` (``[B, q_heads, 1, D]``) over the pages
    of ``batch`` in ``layer`` of ``pool``; the selector picks the path."""
    return (_SELECTOR or default_selector()).run(q, pool, layer, batch, scale)


def path_counts() -> dict[tuple[str, str], int]:
    """(path, reason) -> decode layer-steps since start, for /metrics."""
    return default_selector().path_counts()


__all__ = [
    "DecodeAttention", "DecodeBatch", "Decision", "GatherSDPA", "Path", "Reason", "Selector",
    "decode_attention", "default_selector", "path_counts", "prefill_attention", "set_selector",
]

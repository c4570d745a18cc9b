"""Attention over the slab pool: decode paths behind a selector, and prefill.

A model runner owns one ``AttentionRuntime`` (selector, prefill bucket, host math) and
sends every attention call through it; this package keeps no process-wide state.
"""

from __future__ import annotations

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.attention.gather import GatherSDPA
from slabserve.attention.host_math import HostMath
from slabserve.attention.prefill import prefill_attention
from slabserve.attention.runtime import AttentionRuntime
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import Decision, Path, Reason

__all__ = [
    "AttentionRuntime", "DecodeAttention", "DecodeBatch", "Decision", "GatherSDPA", "HostMath",
    "Path", "Reason", "Selector", "prefill_attention",
]

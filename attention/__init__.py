"""Attention over the slab pool: decode paths behind one entry, and prefill."""

from attention.base import DecodeAttention, DecodeBatch
from attention.gather import GatherSDPA
from attention.prefill import prefill_attention

_GATHER = GatherSDPA()


def decode_attention(q, pool, layer: int, batch: DecodeBatch, scale: float):
    """The one decode entry: attention of ``q`` (``[B, q_heads, 1, D]``) over the pages
    of ``batch`` in ``layer`` of ``pool``."""
    return _GATHER(q, pool, layer, batch, scale)


__all__ = ["DecodeAttention", "DecodeBatch", "GatherSDPA", "decode_attention", "prefill_attention"]

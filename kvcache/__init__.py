"""Slab-paged KV cache: a pure-Python block allocator (with automatic prefix caching)
and an MLX slab pool.

This package imports nothing else of slabserve's.
"""

from slabserve.kvcache.allocator import BlockAllocator
from slabserve.kvcache.block_table import BlockTable, blocks_needed
from slabserve.kvcache.pool import PoolGeometry, SlabPool
from slabserve.kvcache.prefix import BlockKey, block_keys, block_tokens, root_key

__all__ = [
    "BlockAllocator",
    "BlockKey",
    "BlockTable",
    "PoolGeometry",
    "SlabPool",
    "block_keys",
    "block_tokens",
    "blocks_needed",
    "root_key",
]

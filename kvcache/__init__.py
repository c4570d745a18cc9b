"""Slab-paged KV cache: a pure-Python block allocator and an MLX slab pool.

This package imports nothing else of slabserve's.
"""

from slabserve.kvcache.allocator import BlockAllocator
from slabserve.kvcache.block_table import BlockTable, blocks_needed
from slabserve.kvcache.pool import PoolGeometry, SlabPool

__all__ = ["BlockAllocator", "BlockTable", "PoolGeometry", "SlabPool", "blocks_needed"]

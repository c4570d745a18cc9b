"""Slab-paged KV cache: a pure-Python block allocator and an MLX slab pool.

This package imports nothing else of slabserve's.
"""

from kvcache.allocator import BlockAllocator
from kvcache.block_table import BlockTable, blocks_needed
from kvcache.pool import PoolGeometry, SlabPool

__all__ = ["BlockAllocator", "BlockTable", "PoolGeometry", "SlabPool", "blocks_needed"]

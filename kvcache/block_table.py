"""Per-sequence block table: the ordered block ids holding a sequence's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


@dataclass
class BlockTable:
    """Token ``i`` of the sequence lives in block ``blocks[i // block_size]``, row
    ``i % block_size``.  One table serves every layer (block ids are global)."""

    block_size: int
    blocks: list[int] = field(default_factory=list)

    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def extra_blocks_for(self, num_tokens: int) -> int:
        """Blocks to add so that ``num_tokens`` tokens fit."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.blocks))

    def slot(self, position: int) -> tuple[int, int]:
        """(block id, row in block) of token ``position``."""
        return self.blocks[position // self.block_size], position % self.block_size

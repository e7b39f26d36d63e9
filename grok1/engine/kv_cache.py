"""Paged KV cache bookkeeping: a pool of fixed-size blocks and each request's block table.

Pure Python (no torch): the scheduler plans with it on any machine. The tensors themselves live
in `grok1.engine.runner` ([L, P, block_size, K, H] for K and for V); block id 0 is never handed
out here, so the runner can point padded batch slots (CUDA-graph buckets) at it harmlessly.
"""

from __future__ import annotations


class BlockPoolError(RuntimeError):
    """A block was freed twice or never allocated: an engine bug, not a user error."""


class BlockPool:
    """Free list of `num_blocks` blocks with ids 1..num_blocks (0 is the runner's scratch block)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: recently freed blocks are reused first (warm in L2).
        self._free = list(range(num_blocks, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise BlockPoolError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise BlockPoolError(f"KV block {i} freed but not allocated")
            self._used.remove(i)
            self._free.append(i)


def slot_of(block_table: list[int], position: int, block_size: int) -> int:
    """Flat slot index (block * block_size + offset) of a token position in a block table."""
    return block_table[position // block_size] * block_size + position % block_size

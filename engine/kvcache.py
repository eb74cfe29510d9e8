"""The KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

A sequence owns a list of blocks (its row of the block table) and returns them when it ends,
so memory follows actual lengths rather than reserving max_seq_len per slot (vLLM's paging).
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig

KV_BLOCK = 16  # positions per KV-cache block: the one home of the page size


class CacheFull(RuntimeError):
    """Not enough free KV blocks for the request."""


def blocks_for(n_positions: int) -> int:
    return -(-n_positions // KV_BLOCK)


class KVCache:
    def __init__(self, config: ModelConfig, n_blocks: int) -> None:
        if n_blocks <= 0:
            raise ValueError(f"n_blocks must be positive, got {n_blocks}")
        # NOTE: keys are stored transposed within a block, (kv_dim, KV_BLOCK), so attention
        # scores a block's 16 positions as one vector per head dimension (engine/kernels.py)
        self.k = np.zeros((config.n_layers, n_blocks, config.kv_dim, KV_BLOCK), np.float32)
        self.v = np.zeros((config.n_layers, n_blocks, KV_BLOCK, config.kv_dim), np.float32)
        self.n_blocks = n_blocks
        # handed out from the end, so low block ids are reused first (better locality)
        self._free = list(range(n_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFull(f"need {n} KV blocks, {len(self._free)} free of {self.n_blocks}")
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

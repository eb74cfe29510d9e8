"""The KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

A sequence owns a list of blocks (its row of the block table) and returns them when it ends,
so memory follows actual lengths rather than reserving max_seq_len per slot (vLLM's paging).

Blocks are reference-counted so that sequences with the same prefix share them (the prefix
cache, engine/prefix.py computes the keys). A full block may carry a content key; when its
last reference goes it stays cached, evictable, at the tail of an LRU queue, and `allocate`
takes plain free blocks first, then evicts the least recently used cached ones (vLLM's
automatic prefix caching). Evictable blocks count as free, so capacity checks are unchanged.

A block's first rows can also be copied into another sequence's block when their tokens agree
but the blocks do not as a whole (`offer` / `best_rows`): a conversation's next turn continues
its history inside the history's last, partial block, and the n choices of a prompt, or the
same prompt sent again, share the rows of the block where that prompt ends. Such blocks are
indexed by an anchor (engine/prefix.py `row_anchor`: the parent block's key and the steering
at the block) and the tokens they hold; they stay cached, and evictable, like keyed ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig

KV_BLOCK = 16  # positions per KV-cache block: the one home of the page size


class CacheFull(RuntimeError):
    """Not enough free KV blocks for the request."""


def blocks_for(n_positions: int) -> int:
    return -(-n_positions // KV_BLOCK)


@dataclass
class CacheStats:
    """Running totals of the prefix cache (read by /metrics without a lock)."""

    lookups: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from cached blocks
    hit_blocks: int = 0
    row_hits: int = 0  # lookups that copied the first rows of a cached block
    evictions: int = 0  # cached blocks dropped to make room


CACHE_TYPES = ("f32", "bf16")


def cache_arrays(config: ModelConfig, n_blocks: int, type_k: str = "f32",
                 type_v: str = "f32") -> tuple[np.ndarray, np.ndarray]:
    """Zeroed K and V pools. float32 keys are stored transposed within a block, (kv_dim,
    KV_BLOCK), so attention scores a block's 16 positions as one vector per head dimension;
    bfloat16 (uint16) ones as (kv_dim / 2, KV_BLOCK, 2), a pair of dims per position, what
    vdpbf16ps multiplies with a pair of query dims. bfloat16 values as (KV_BLOCK / 2, kv_dim,
    2): a pair of positions per dim, for a pair of weights (engine/kernels.py, simd.py)."""
    for name, kind in (("type_k", type_k), ("type_v", type_v)):
        if kind not in CACHE_TYPES:
            raise ValueError(f"{name} must be one of {CACHE_TYPES}, got {kind!r}")
    c, n = config, n_blocks
    if "bf16" in (type_k, type_v) and c.head_dim % 16:
        raise ValueError(f"a bf16 KV cache needs a head width that is a multiple of 16; this "
                         f"model's is {c.head_dim}")
    k = (np.zeros((c.n_layers, n, c.kv_dim // 2, KV_BLOCK, 2), np.uint16) if type_k == "bf16"
         else np.zeros((c.n_layers, n, c.kv_dim, KV_BLOCK), np.float32))
    v = (np.zeros((c.n_layers, n, KV_BLOCK // 2, c.kv_dim, 2), np.uint16) if type_v == "bf16"
         else np.zeros((c.n_layers, n, KV_BLOCK, c.kv_dim), np.float32))
    return k, v


class KVCache:
    def __init__(self, config: ModelConfig, n_blocks: int, type_k: str = "f32",
                 type_v: str = "f32") -> None:
        if n_blocks <= 0:
            raise ValueError(f"n_blocks must be positive, got {n_blocks}")
        self.k, self.v = cache_arrays(config, n_blocks, type_k, type_v)
        self.n_blocks = n_blocks
        # handed out from the end, so low block ids are reused first (better locality)
        self._free = list(range(n_blocks - 1, -1, -1))
        self._refs = [0] * n_blocks
        self._key_of: dict[int, bytes] = {}  # block -> content key
        self._block_of: dict[bytes, int] = {}  # content key -> block
        self._rows_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> anchor, tokens
        # (anchor, first token) -> block: tokens. NOTE: the first token in the index key keeps
        # a lookup from scanning every block under one anchor (every unsteered sequence's
        # first block shares one): only blocks that agree on a row at all are compared
        self._by_anchor: dict[tuple[bytes, int], dict[int, tuple[int, ...]]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refs 0, keyed; oldest first
        self.stats = CacheStats()

    def prefault(self) -> None:
        """Write every page of the pools now. Zeroed pools are only mapped: a block's first
        write faults its pages in, which costs ~1.5 ms a block here (a 576 MiB pool fills at
        ~350 MB/s on this VM), and the allocator hands out never-used blocks before it evicts
        cached ones, so a server would pay it inside its first ~thousand blocks' steps.
        llama.cpp clears its KV buffer when it creates it, for the same effect."""
        self.k.fill(0)
        self.v.fill(0)

    @property
    def type_k(self) -> str:
        return "bf16" if self.k.dtype == np.uint16 else "f32"

    @property
    def type_v(self) -> str:
        return "bf16" if self.v.dtype == np.uint16 else "f32"

    @property
    def free_blocks(self) -> int:
        """Blocks `allocate` can hand out: free ones and cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence references."""
        return self.n_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a content key or offering their rows (referenced or not)."""
        return len(self._key_of.keys() | self._rows_of.keys())

    def _cached(self, block: int) -> bool:
        return block in self._key_of or block in self._rows_of

    @property
    def evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def shared_blocks(self) -> int:
        """Blocks referenced by more than one sequence."""
        return sum(1 for r in self._refs if r > 1)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.free_blocks:
            raise CacheFull(f"need {n} KV blocks, {self.free_blocks} free of {self.n_blocks}")
        k = min(n, len(self._free))
        taken = self._free[len(self._free) - k:][::-1]
        del self._free[len(self._free) - k:]
        for _ in range(n - k):
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.stats.evictions += 1
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def release(self, blocks: list[int]) -> None:
        # NOTE: in reverse, so a sequence's last blocks (the least likely to be shared) are the
        # first evicted
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise RuntimeError(f"KV block {block} released more often than it was taken")
            self._refs[block] = refs
            if refs:
                continue
            if self._cached(block):
                self._evictable[block] = None
            else:
                self._free.append(block)

    # content addressing ----------------------------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        """The block cached under `key`, if any (no reference taken)."""
        return self._block_of.get(key)

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block (a prefix hit); it stops being evictable."""
        if not self._cached(block):
            raise RuntimeError(f"KV block {block} is not cached")
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, key: bytes) -> bool:
        """Cache a full block under its content key; False (and the block stays private) if
        another block already holds that key or this one already has a key."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is not held by any sequence")
        if key in self._block_of or block in self._key_of:
            return False
        self._key_of[block] = key
        self._block_of[key] = block
        return True

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
        rows = self._rows_of.pop(block, None)
        if rows is not None:
            self._unindex(block, rows)

    # rows of blocks ----------------------------------------------------------------------------

    def offer(self, block: int, anchor: bytes, tokens: tuple[int, ...]) -> None:
        """Let later sequences copy this block's first rows: it holds K/V for `tokens` (its
        first len(tokens) positions, final) under `anchor`. A block offers itself once per
        anchor and token prefix; offering more tokens replaces what it offered before."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is not held by any sequence")
        old = self._rows_of.get(block)
        if old is not None and old[0] != anchor:
            raise RuntimeError(f"KV block {block} offered under two anchors")
        if not tokens:
            return
        same = self._by_anchor.setdefault((anchor, tokens[0]), {})
        for other, held in same.items():  # another block already offers these rows
            if other != block and held[:len(tokens)] == tokens:
                return
        if old is not None:
            self._unindex(block, old)
        self._by_anchor.setdefault((anchor, tokens[0]), {})[block] = tokens
        self._rows_of[block] = (anchor, tokens)

    def _unindex(self, block: int, rows: tuple[bytes, tuple[int, ...]]) -> None:
        key = (rows[0], rows[1][0])
        same = self._by_anchor[key]
        del same[block]
        if not same:
            del self._by_anchor[key]

    def best_rows(self, anchor: bytes, tokens: tuple[int, ...]) -> tuple[int, int] | None:
        """The cached block under `anchor` whose tokens agree longest with `tokens`, and how
        many of its first rows do (None: none agrees on the first token)."""
        best, best_n = -1, 0
        if not tokens:
            return None
        for block, held in self._by_anchor.get((anchor, tokens[0]), {}).items():
            n = 0
            for a, b in zip(held, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = block, n
        return (best, best_n) if best_n else None

    def copy_rows(self, src: int, dst: int, n: int) -> None:
        """K/V of the first n positions of block src into block dst (all layers). bfloat16
        values go by pairs of positions: an odd n copies position n too, which dst's sequence
        computes (and overwrites) before any weight of its reads it."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        rows = (n + 1) // 2 if self.type_v == "bf16" else n
        self.v[:, dst, :rows] = self.v[:, src, :rows]

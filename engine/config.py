"""Model hyperparameters, read once from a file header; derived sizes live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Q8_0 group size of the engine: weights and activations are quantized in groups of this many
# values along each row (the last group of a row may be shorter).
GROUP_SIZE = 32


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) does not divide dim ({self.dim})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) does not divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def kv_mul(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


def rope_tables(config: ModelConfig, torch_float32: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_seq_len, head_dim/2) for llama2.c's pairwise RoPE: the one home of them.

    The engine's are computed in float64 and rounded once. `torch_float32` gives instead what
    llama2.c's model.py (precompute_freqs_cis, in float32) stores in a v0 file's freq_cis --
    to about 1 ulp of PyTorch's, not bit for bit; run.c never reads them.
    """
    hd = config.head_dim
    if torch_float32:
        exponent = np.arange(0, hd, 2)[: hd // 2].astype(np.float32) / np.float32(hd)
        freqs32 = np.float32(1.0) / np.float32(config.rope_theta) ** exponent
        angles32 = np.outer(np.arange(config.max_seq_len, dtype=np.float32), freqs32)
        return np.cos(angles32).astype(np.float32), np.sin(angles32).astype(np.float32)
    freqs = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(config.max_seq_len, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

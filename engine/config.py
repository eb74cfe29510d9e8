"""Model hyperparameters, read once from a file header; derived sizes live here and nowhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Q8_0 group size of the engine: weights and activations are quantized in groups of this many
# values along each row (the last group of a row may be shorter).
GROUP_SIZE = 32
ARCHITECTURES = ("llama", "qwen2", "qwen3")


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
    # Llama 3 / Qwen 2 / Qwen 3 (engine/gguf.py reads them; llama2.c files keep the defaults)
    arch: str = "llama"  # "llama", "qwen2" (q/k/v biases) or "qwen3" (q/k RMSNorm per head)
    head_size: int = 0  # key/value length of a head; 0: dim // n_heads (Qwen 3's is its own)
    rope_neox: bool = False  # rotate halves (x[i], x[i + hd/2]), not adjacent pairs (qwen2/3)
    rope_factors: tuple[float, ...] = ()  # per-frequency divisors (Llama 3.1's rope_freqs)
    rope_scale: float = 1.0  # linear RoPE scaling: positions are multiplied by it

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if not isinstance(self.head_size, int) or self.head_size < 0:
            raise ValueError(f"head_size must be a non-negative integer, got {self.head_size!r}")
        if not self.head_size and self.dim % self.n_heads:
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
        if self.rope_factors and len(self.rope_factors) != self.head_dim // 2:
            raise ValueError(f"rope_factors has {len(self.rope_factors)} values, RoPE needs "
                             f"head_dim / 2 = {self.head_dim // 2}")
        if not all(f > 0 for f in self.rope_factors) or not self.rope_scale > 0:
            raise ValueError("rope_factors and rope_scale must be positive")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention output (wo's input): dim unless head_size
        says otherwise (Qwen3-0.6B: dim 1024, 16 heads of 128 -> 2048)."""
        return self.head_dim * self.n_heads

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

    Frequency i is theta^(-2i/head_dim) / rope_factors[i] (llama.cpp's ggml_rope_ext with
    freq_factors) at position p * rope_scale.

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
    if config.rope_factors:
        freqs = freqs / np.array(config.rope_factors, np.float64)
    positions = np.arange(config.max_seq_len, dtype=np.float64) * config.rope_scale
    angles = positions[:, None] * freqs[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> tuple[float, ...]:
    """Llama 3.1's RoPE frequency divisors, as llama.cpp's convert_hf_to_gguf.py computes the
    rope_freqs tensor from a config.json's rope_scaling (wavelengths longer than the original
    context / low_freq_factor are divided by `factor`, shorter than / high_freq_factor kept,
    the band between interpolated smoothly)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor
                                                                        - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(f)) for f in out)

"""The Llama model in PyTorch, written in the conventions of a GGUF `llama` file as tiller runs it.

RoPE rotates adjacent pairs (x[2i], x[2i+1]) of each head by pos * theta^(-2i/head_dim): llama2.c's
and llama.cpp's "NORM" rope for `llama` GGUFs, so wq and wk are exported as they are (no
Hugging Face half-rotation permutation). Matrices are (out, in) like GGUF rows. The classifier
is tied to the embedding (no output.weight: tiller then uses token_embd as the classifier).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden_dim: int = 704  # ~2.75 x dim, a multiple of 32 so every row can be Q8_0
    vocab_size: int = 1024
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must divide dim and n_kv_heads must divide n_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, head_dim / 2), computed in float64 as tiller does."""
    hd = args.head_dim
    freqs = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, head_dim), cos/sin (T, head_dim/2): rotate pairs (x[2i], x[2i+1])."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        kv_dim = a.n_kv_heads * a.head_dim
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.wq = nn.Linear(a.dim, a.dim, bias=False)
        self.wk = nn.Linear(a.dim, kv_dim, bias=False)
        self.wv = nn.Linear(a.dim, kv_dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=False)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)  # down

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.a
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = apply_rope(self.wq(h).view(B, T, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(self.wk(h).view(B, T, a.n_kv_heads, a.head_dim), cos, sin)
        v = self.wv(h).view(B, T, a.n_kv_heads, a.head_dim)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=a.n_kv_heads != a.n_heads)
        x = x + self.wo(att.transpose(1, 2).reshape(B, T, a.dim))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        cos, sin = rope_tables(a)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        # NOTE: GPT-2's scaled init of residual projections keeps early training stable
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * a.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab); the classifier is the embedding matrix."""
        T = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:T], self.sin[:T])
        return self.norm(x) @ self.tok_embeddings.weight.T

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

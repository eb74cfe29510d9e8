"""Plain-numpy Llama forward pass with llama2.c `run.c` semantics: the oracle for engine kernels.

NOTE: this module must stay independent of the engine's kernels and forward code (it imports
only `engine.config` and `engine.quant`, which hold no kernels). Its value as an oracle comes
from being written separately, vectorised the obvious numpy way rather than the engine's way.

Weights are a dict of float32 arrays, row-major [out, in] like `nn.Linear.weight`, stacked over
layers: token_embedding (vocab, dim), attn_norm (L, dim), wq (L, dim, dim), wk/wv
(L, kv_dim, dim), wo (L, dim, dim), ffn_norm (L, dim), w1/w3 (L, hidden, dim), w2 (L, dim, hidden),
final_norm (dim,), optional classifier (vocab, dim; the token embedding when absent); qwen2's
bq (L, q_dim), bk/bv (L, kv_dim) and qwen3's q_norm/k_norm (L, head_dim) when the config's arch
has them (wq is then (L, q_dim, dim) and wo (L, dim, q_dim), q_dim = n_heads * head_dim). Quantized
mode additionally reads `name + "_q8"` entries: (int8 values, float32 scales) pairs or QTensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tiller.engine.config import GROUP_SIZE, ModelConfig
from tiller.engine.quant import quantize_q8_0

LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
CAPTURE_NAMES = ("resid_pre", "attn_out", "mlp_out", "resid_post")

Steering = dict[int, np.ndarray]
Edit = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (layer, x (T, dim), positions)


# ----------------------------------------------------------------------------------------------
# Q8_0 activations and matmuls


def quantize_activations(x: np.ndarray, group_size: int = GROUP_SIZE
                         ) -> tuple[np.ndarray, np.ndarray]:
    """float (..., n) -> int8 values (..., n) and float32 scales (..., ceil(n / group_size)).

    NOTE: written out here rather than calling engine.quant so that the convention is checked
    twice: amax per group, scale = amax / 127, q = rint(x * (127 / amax)), all in float32.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    q = np.zeros(x.shape, dtype=np.int8)
    scales = np.zeros((*x.shape[:-1], -(-n // group_size)), dtype=np.float32)
    for g, start in enumerate(range(0, n, group_size)):
        block = x[..., start:start + group_size]
        amax = np.abs(block).max(axis=-1)
        nonzero = amax > 0
        inv = np.float32(127.0) / np.where(nonzero, amax, np.float32(1.0))
        q[..., start:start + group_size] = np.where(
            nonzero[..., None], np.rint(block * inv[..., None]), 0).astype(np.int8)
        scales[..., g] = amax / np.float32(127.0)
    return q, scales


def q8_matmul(x: np.ndarray, w_values: np.ndarray, w_scales: np.ndarray,
              group_size: int = GROUP_SIZE) -> np.ndarray:
    """x (T, n) float, W int8 (d, n) with scales (d, groups) -> (T, d) float32.

    The activations are quantized per group, each group's dot product is an exact integer, and
    the integer sums are weighted by weight_scale * activation_scale and added over groups.
    """
    xq, xs = quantize_activations(x, group_size)
    n = x.shape[-1]
    if w_values.shape[-1] != n:
        raise ValueError(f"weight has {w_values.shape[-1]} columns, activation has {n}")
    out = np.zeros((x.shape[0], w_values.shape[0]), dtype=np.float64)
    for g, start in enumerate(range(0, n, group_size)):
        # NOTE: float64 holds these integer dot products exactly (|sum| <= 32 * 127 * 127), so
        # BLAS gives the exact int32 result without a slow integer einsum.
        xg = xq[:, start:start + group_size].astype(np.float64)
        wg = w_values[:, start:start + group_size].astype(np.float64)
        scale = (w_scales[None, :, g] * xs[:, g, None]).astype(np.float32)
        out += (xg @ wg.T) * scale
    return out.astype(np.float32)


def _q8_parts(entry: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(entry, "values") and hasattr(entry, "scales"):
        return entry.values, entry.scales
    values, scales = entry
    return values, scales


def add_q8_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """A copy of `weights` with `name_q8` (values, scales) pairs for every matrix."""
    out = dict(weights)
    names = [*LAYER_MATRICES, "token_embedding"] + (["classifier"] if "classifier" in weights
                                                     else [])
    for name in names:
        qt = quantize_q8_0(weights[name])
        out[name + "_q8"] = (qt.values, qt.scales)
    return out


# ----------------------------------------------------------------------------------------------
# Building blocks


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, n), w (n,) -> (T, n): x * w / sqrt(mean(x^2) + eps)."""
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)) * w).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float,
                 factors: tuple[float, ...] = (), scale: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """positions (T,) -> cos, sin (T, head_dim // 2) of frequency j = theta^(-2j/head_dim),
    divided by factors[j] when given (llama.cpp's freq_factors), at position * scale."""
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    freq = 1.0 / theta ** (i / head_dim)
    if factors:
        freq = freq / np.asarray(factors, dtype=np.float64)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * scale * freq[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply_rope(x: np.ndarray, positions: np.ndarray, head_dim: int, theta: float,
               neox: bool = False, factors: tuple[float, ...] = (), scale: float = 1.0
               ) -> np.ndarray:
    """x (T, n_heads * head_dim) -> same shape, each head rotated.

    llama2.c / llama.cpp "NORM" convention: pairs are interleaved (x[2j], x[2j+1]); with `neox`
    (Hugging Face, llama.cpp's NEOX for qwen2/qwen3) the pairs are (x[j], x[j + head_dim/2]).
    """
    t = x.shape[0]
    cos, sin = rope_cos_sin(positions, head_dim, theta, factors, scale)
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        heads = x.reshape(t, -1, head_dim)
        x0, x1 = heads[..., :head_dim // 2], heads[..., head_dim // 2:]
        out = np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
        return out.reshape(x.shape).astype(np.float32)
    pairs = x.reshape(t, -1, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(np.float32)


def head_rmsnorm(x: np.ndarray, w: np.ndarray, head_dim: int, eps: float) -> np.ndarray:
    """x (T, n_heads * head_dim) -> each head RMS-normalized with weights w (head_dim,)."""
    heads = x.reshape(x.shape[0], -1, head_dim)
    return rmsnorm(heads, w, eps).reshape(x.shape)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even; subnormals to +0), as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    top = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    top = np.where((u & 0x7F800000) == 0, 0, top)
    return top.astype(np.uint32).view(np.float32)


def kv_is_bf16(config: ModelConfig, quantized: bool, kv_type: str | None) -> bool:
    """The KV cache type a Q8_0 or f32 engine uses by default (engine/engine.py), or kv_type."""
    if kv_type is None:
        return quantized and config.head_dim % 16 == 0
    return kv_type == "bf16"


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                     config: ModelConfig, bf16: bool = False) -> np.ndarray:
    """q (T, n_heads * hd) at `positions`, k/v (P, kv_dim) for 0..P-1 -> (T, n_heads * hd).

    Query head h reads kv head h // kv_mul; position p attends to 0..p. With `bf16` (a
    bfloat16 KV cache) queries, keys, values and the softmax weights are rounded to bfloat16
    before they are multiplied.
    """
    if bf16:
        q, k, v = round_bf16(q), round_bf16(k), round_bf16(v)
    hd, kv_mul = config.head_dim, config.n_heads // config.n_kv_heads
    t, p = q.shape[0], k.shape[0]
    qh = q.reshape(t, config.n_heads, hd).transpose(1, 0, 2)               # (H, T, hd)
    kh = np.repeat(k.reshape(p, config.n_kv_heads, hd).transpose(1, 0, 2), kv_mul, axis=0)
    vh = np.repeat(v.reshape(p, config.n_kv_heads, hd).transpose(1, 0, 2), kv_mul, axis=0)
    scores = (qh @ kh.transpose(0, 2, 1)) / np.float32(math.sqrt(hd))    # (H, T, P)
    future = np.arange(p)[None, :] > np.asarray(positions)[:, None]       # (T, P)
    scores = np.where(future[None], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if bf16:
        probs = round_bf16(probs)
    out = probs.astype(np.float32) @ vh                                     # (H, T, hd)
    return out.transpose(1, 0, 2).reshape(t, config.n_heads * hd).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Forward pass


@dataclass
class KVCache:
    """Keys and values (L, capacity, kv_dim) of one sequence; rows 0..length-1 are valid."""

    k: np.ndarray
    v: np.ndarray
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, capacity: int) -> KVCache:
        shape = (config.n_layers, capacity, config.kv_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))


class _Linear:
    """Applies the model's matrices in fp32 or Q8_0 mode; one place decides which."""

    def __init__(self, weights: dict[str, Any], quantized: bool) -> None:
        self.weights = weights
        self.quantized = quantized
        if quantized:
            missing = [n + "_q8" for n in LAYER_MATRICES if n + "_q8" not in weights]
            if "classifier" in weights and "classifier_q8" not in weights:
                missing.append("classifier_q8")
            if "classifier" not in weights and "token_embedding_q8" not in weights:
                missing.append("token_embedding_q8 (shared classifier)")
            if missing:
                raise ValueError(f"quantized mode needs Q8_0 weights; missing {missing} "
                                 "(see add_q8_weights)")

    def __call__(self, x: np.ndarray, name: str, layer: int | None = None) -> np.ndarray:
        """x (T, n) -> (T, d) through matrix `name` (of `layer` when stacked)."""
        if name == "classifier" and "classifier" not in self.weights:
            name = "token_embedding"
        if not self.quantized:
            w = self.weights[name]
            w = w[layer] if layer is not None else w
            return (x @ w.T).astype(np.float32)
        values, scales = _q8_parts(self.weights[name + "_q8"])
        if layer is not None:
            values, scales = values[layer], scales[layer]
        return q8_matmul(x, values, scales)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        if self.quantized and "token_embedding_q8" in self.weights:
            values, scales = _q8_parts(self.weights["token_embedding_q8"])
            rows = values[tokens].astype(np.float32)
            return rows * np.repeat(scales[tokens], GROUP_SIZE, axis=-1)[:, :rows.shape[1]]
        return np.asarray(self.weights["token_embedding"][tokens], dtype=np.float32)


def _check_steering(steering: Steering | None, config: ModelConfig) -> Steering:
    if not steering:
        return {}
    out = {}
    for layer, vec in steering.items():
        if not 0 <= layer <= config.n_layers:  # n_layers: after the last layer
            raise ValueError(f"steering layer {layer} out of range 0..{config.n_layers}")
        vec = np.asarray(vec, dtype=np.float32)
        if vec.ndim not in (1, 2) or vec.shape[-1] != config.dim:
            raise ValueError(f"steering at layer {layer} must be (dim,) or (T, dim) with "
                             f"dim={config.dim}, got shape {vec.shape}")
        out[layer] = vec
    return out


def _steering_rows(vec: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The (T, dim) addition for `positions`: zero beyond the last row of a (T_s, dim) vector."""
    if vec.ndim == 1:
        return np.broadcast_to(vec, (len(positions), vec.shape[0]))
    rows = np.zeros((len(positions), vec.shape[1]), dtype=np.float32)
    inside = positions < vec.shape[0]
    rows[inside] = vec[positions[inside]]
    return rows


def _forward_chunk(weights: dict[str, Any], config: ModelConfig, tokens: np.ndarray,
                   cache: KVCache, linear: _Linear, steering: Steering,
                   captures: dict[str, np.ndarray] | None, edit: Edit | None = None,
                   kv_bf16: bool = False) -> np.ndarray:
    """Runs `tokens` at positions cache.length.. against the cache -> logits (T, vocab).

    Appends the chunk's keys and values to the cache; fills `captures` (L, T, dim) if given.
    """
    t = len(tokens)
    start = cache.length
    positions = np.arange(start, start + t)
    end = start + t
    x = linear.embed(tokens)                                                # (T, dim)
    for layer in range(config.n_layers):
        if edit is not None:
            x = edit(layer, x, positions)
        if layer in steering:
            x = x + _steering_rows(steering[layer], positions)
        if captures is not None:
            captures["resid_pre"][layer] = x

        # attention block
        xb = rmsnorm(x, weights["attn_norm"][layer], config.norm_eps)
        q = linear(xb, "wq", layer)
        k = linear(xb, "wk", layer)
        v = linear(xb, "wv", layer)
        if "bq" in weights:  # qwen2
            q, k, v = q + weights["bq"][layer], k + weights["bk"][layer], v + weights["bv"][layer]
        if "q_norm" in weights:  # qwen3
            q = head_rmsnorm(q, weights["q_norm"][layer], config.head_dim, config.norm_eps)
            k = head_rmsnorm(k, weights["k_norm"][layer], config.head_dim, config.norm_eps)
        rope = (config.head_dim, config.rope_theta, config.rope_neox, config.rope_factors,
                config.rope_scale)
        q = apply_rope(q, positions, *rope)
        k = apply_rope(k, positions, *rope)
        cache.k[layer, start:end] = k
        cache.v[layer, start:end] = v
        att = causal_attention(q, cache.k[layer, :end], cache.v[layer, :end], positions, config,
                               kv_bf16)
        attn_out = linear(att, "wo", layer)
        x = x + attn_out

        # SwiGLU feed-forward block
        xb = rmsnorm(x, weights["ffn_norm"][layer], config.norm_eps)
        h = silu(linear(xb, "w1", layer)) * linear(xb, "w3", layer)
        mlp_out = linear(h, "w2", layer)
        x = x + mlp_out

        if captures is not None:
            captures["attn_out"][layer] = attn_out
            captures["mlp_out"][layer] = mlp_out
            captures["resid_post"][layer] = x
    cache.length = end
    if edit is not None:
        x = edit(config.n_layers, x, positions)
    if config.n_layers in steering:  # after the last layer, before the final norm
        x = x + _steering_rows(steering[config.n_layers], positions)
    x = rmsnorm(x, weights["final_norm"], config.norm_eps)
    return linear(x, "classifier")


def _check_tokens(tokens: Any, config: ModelConfig) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("tokens must be a non-empty 1-D sequence of ids")
    if arr.min() < 0 or arr.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in 0..{config.vocab_size - 1}")
    return arr


def reference_forward(weights: dict[str, Any], config: ModelConfig, tokens: list[int], *,
                      quantized: bool = False, steering: Steering | None = None,
                      capture: bool = True, edit: Edit | None = None,
                      kv_type: str | None = None) -> dict[str, np.ndarray]:
    """All positions of one sequence from position 0 (teacher forcing).

    Returns `logits` (T, vocab) and, when `capture`, the residual-stream tensors (L, T, dim):
    `resid_pre` (entering layer l, after its steering addition), `attn_out` (after wo, before
    the residual add), `mlp_out` (after w2, before the residual add), `resid_post` (leaving l).
    `steering` maps layer -> (T_s, dim) added at positions 0..T_s-1, or (dim,) added everywhere.
    `edit(layer, x, positions) -> x` rewrites the stream entering each layer (0..n_layers)
    before `steering` is added (any intervention, written by the test). `kv_type` "f32" or
    "bf16"; by default the engine's for the mode (`kv_is_bf16`).
    """
    toks = _check_tokens(tokens, config)
    if len(toks) > config.max_seq_len:
        raise ValueError(f"{len(toks)} tokens exceed max_seq_len {config.max_seq_len}")
    t = len(toks)
    captures = None
    if capture:
        captures = {name: np.zeros((config.n_layers, t, config.dim), np.float32)
                    for name in CAPTURE_NAMES}
    cache = KVCache.empty(config, t)
    logits = _forward_chunk(weights, config, toks, cache, _Linear(weights, quantized),
                            _check_steering(steering, config), captures, edit,
                            kv_is_bf16(config, quantized, kv_type))
    return {"logits": logits, **(captures or {})}


def reference_generate(weights: dict[str, Any], config: ModelConfig, prompt_tokens: list[int],
                       n: int, *, quantized: bool = False,
                       steering: Steering | None = None, kv_type: str | None = None
                       ) -> list[int]:
    """Greedy continuation: exactly `n` new ids (argmax, ties -> lowest id), no stop token.

    Steering rows are indexed by absolute position, as in `reference_forward`.
    """
    toks = _check_tokens(prompt_tokens, config)
    if len(toks) + n > config.max_seq_len:
        raise ValueError(f"prompt of {len(toks)} + {n} new tokens exceeds max_seq_len "
                         f"{config.max_seq_len}")
    linear = _Linear(weights, quantized)
    steer = _check_steering(steering, config)
    cache = KVCache.empty(config, len(toks) + n)
    bf16 = kv_is_bf16(config, quantized, kv_type)
    logits = _forward_chunk(weights, config, toks, cache, linear, steer, None, None, bf16)
    out: list[int] = []
    for _ in range(n):
        # NOTE: np.argmax returns the first maximum, which is the lowest id on ties.
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        if len(out) == n:
            break
        logits = _forward_chunk(weights, config, np.array([nxt]), cache, linear, steer, None,
                                None, bf16)
    return out


# ----------------------------------------------------------------------------------------------
# Models: the llama2.c v0 legacy file and random test models


def load_v0_legacy(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """llama2.c legacy checkpoint -> (config, weights dict).

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len;
    a negative vocab_size means an unshared classifier), then fp32 tensors in run.c order.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 28:
        raise ValueError(f"{path}: too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (
        int(v) for v in raw[:28].view(np.int32))
    shared = vocab > 0
    config = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, vocab_size=abs(vocab), max_seq_len=seq_len,
                         shared_classifier=shared)
    kv, hd, v = config.kv_dim, config.head_dim, config.vocab_size
    layout: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (v, dim)), ("attn_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)),
        ("wo", (n_layers, dim, dim)), ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)), ("final_norm", (dim,)),
        ("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not shared:
        layout.append(("classifier", (v, dim)))
    floats = raw[28:]
    needed = 4 * sum(math.prod(shape) for _, shape in layout)
    if floats.size != needed:
        raise ValueError(f"{path}: expected {needed} bytes of weights after the header for "
                         f"{config}, found {floats.size}")
    data = floats.view(np.float32)
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        weights[name] = data[offset:offset + size].reshape(shape).copy()
        offset += size
    # NOTE: run.c skips the stored RoPE tables and recomputes them; so does this reference.
    del weights["freq_cis_real"], weights["freq_cis_imag"]
    return config, weights


def random_weights(config: ModelConfig, seed: int = 0, *, shared_classifier: bool = True
                   ) -> dict[str, np.ndarray]:
    """A random model whose activations stay O(1): matrices ~ N(0, 1/fan_in), norms near 1."""
    rng = np.random.default_rng(seed)
    L, d, h, kv, v, q = (config.n_layers, config.dim, config.hidden_dim, config.kv_dim,
                         config.vocab_size, config.q_dim)

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)

    def norm(*shape: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    weights = {
        "token_embedding": rng.standard_normal((v, d)).astype(np.float32),
        "attn_norm": norm(L, d), "wq": mat(L, q, d), "wk": mat(L, kv, d), "wv": mat(L, kv, d),
        "wo": mat(L, d, q), "ffn_norm": norm(L, d), "w1": mat(L, h, d), "w2": mat(L, d, h),
        "w3": mat(L, h, d), "final_norm": norm(d),
    }
    if not shared_classifier:
        weights["classifier"] = mat(v, d)
    if config.arch == "qwen2":
        weights |= {"bq": (0.1 * rng.standard_normal((L, q))).astype(np.float32),
                    "bk": (0.1 * rng.standard_normal((L, kv))).astype(np.float32),
                    "bv": (0.1 * rng.standard_normal((L, kv))).astype(np.float32)}
    if config.arch == "qwen3":
        weights |= {"q_norm": norm(L, config.head_dim), "k_norm": norm(L, config.head_dim)}
    return weights

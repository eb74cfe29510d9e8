"""The engine's weight layout, built once at load from a checkpoint's named tensors.

Layout (see engine/simd.py for why):
- Matrices [out, in] have their rows zero-padded to a multiple of the tile chunk (64 values in
  Q8_0, 16 in f32). f32 matrices are row-major, with scales of shape (..., rows, 0).
- Q8_0 values are stored as uint8 `q + 128` with float32 scales per group of 32 (pad groups and
  pad rows have scale 0), interleaved in blocks of 16 rows: values (..., rows16/16, in/4, 64)
  with [rb, k, 4 i + j] = row 16 rb + i, column 4 k + j, scales (..., rows16/16, in/32, 16).
  An embedding that is not the classifier stays row-major (vocab, in): it is only looked up.
- q, k and v projections are fused into one `wqkv` matrix (rows: q, then k, then v), and w1/w3
  into `w13` (rows: w1, then w3), so a layer makes three weight passes instead of five.
- Models whose RoPE rotates halves (qwen2, qwen3: config.rope_neox) have the rows of each q and
  k head (and their biases and norm weights) reordered so that pairwise RoPE does the same
  rotation (`qk_order`): attention scores are dot products within a head, unchanged by a
  permutation applied to both q and k, and v is left alone.
- The embedding is the classifier matrix when the model shares them; rows are dequantized on
  lookup, so Q8_0 embeddings see the same rounding as llama.cpp's Q8_0 token_embd.
Nothing here is ever written after load: steering and caches belong to requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from .config import GROUP_SIZE, ModelConfig, rope_tables
from .dequant import Packed
from .quant import QTensor, dequantize_q8_0, n_groups, quantize_q8_0
from .simd import F32_CHUNK, Q8_CHUNK, ROW_BLOCK

DTYPES = ("q8_0", "f32")
# NOTE: bump when the arrays of Weights change shape or meaning (caches of built weights key on it)
LAYOUT_VERSION = 2  # 2: Q8_0 matrices interleaved in 16-row blocks


class Weights(NamedTuple):
    # Q8_0 matrices below are interleaved (see the module docstring); shapes are given row-major
    embedding: np.ndarray  # (vocab, dim_pad) uint8 | float32; the classifier's when shared
    embedding_scales: np.ndarray  # (vocab, dim_pad/32) float32 | (vocab, 0)
    attn_norm: np.ndarray  # (L, dim)
    wqkv: np.ndarray  # (L, q_dim + 2 kv_dim, dim_pad)
    wqkv_scales: np.ndarray
    wo: np.ndarray  # (L, dim, q_dim_pad)
    wo_scales: np.ndarray
    ffn_norm: np.ndarray  # (L, dim)
    w13: np.ndarray  # (L, 2 hidden, dim_pad)
    w13_scales: np.ndarray
    w2: np.ndarray  # (L, dim, hidden_pad)
    w2_scales: np.ndarray
    final_norm: np.ndarray  # (dim,)
    classifier: np.ndarray  # (vocab, dim_pad)
    classifier_scales: np.ndarray
    rope_cos: np.ndarray  # (max_seq_len, head_dim / 2)
    rope_sin: np.ndarray
    # optional (empty (L, 0) when the architecture has none, so the step's types stay fixed)
    bqkv: np.ndarray  # (L, q_dim + 2 kv_dim) f32: qwen2's q/k/v biases
    q_norm: np.ndarray  # (L, head_dim) f32: qwen3's per-head RMSNorm weights of q
    k_norm: np.ndarray  # (L, head_dim) f32: and of k


def padded(n: int, dtype: str) -> int:
    chunk = Q8_CHUNK if dtype == "q8_0" else F32_CHUNK
    return -(-n // chunk) * chunk


Tensor = np.ndarray | QTensor | Packed
Progress = Callable[[int, int, str], None]  # (tensors done, total, name of the last one)


def _as_float(t: Tensor) -> np.ndarray:
    if isinstance(t, Packed):
        return t.dequantize()
    return t.dequantize() if isinstance(t, QTensor) else np.asarray(t, dtype=np.float32)


def _count(t: Tensor) -> int:
    """Tensors of a file in t: its layers when stacked."""
    if isinstance(t, Packed):
        return len(t.parts)
    return t.shape[0] if len(t.shape) == 3 else 1


def interleave(values: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-major Q8_0 (..., rows, n) uint8 and (..., rows, n/32) scales -> the interleaved
    layout (..., rows16/16, n/4, 64) and (..., rows16/16, n/32, 16); pad rows are zeros."""
    *lead, rows, n = values.shape
    blocks = -(-rows // ROW_BLOCK)
    pad = blocks * ROW_BLOCK - rows
    if pad:
        values = np.concatenate([values, np.full((*lead, pad, n), 128, np.uint8)], axis=-2)
        scales = np.concatenate([scales, np.zeros((*lead, pad, scales.shape[-1]), np.float32)],
                                axis=-2)
    v = values.reshape(*lead, blocks, ROW_BLOCK, n // 4, 4).swapaxes(-3, -2)
    s = scales.reshape(*lead, blocks, ROW_BLOCK, scales.shape[-1]).swapaxes(-2, -1)
    return (np.ascontiguousarray(v).reshape(*lead, blocks, n // 4, 4 * ROW_BLOCK),
            np.ascontiguousarray(s))


def deinterleave(values: np.ndarray, scales: np.ndarray,
                 rows: int) -> tuple[np.ndarray, np.ndarray]:
    """interleave's inverse, the first `rows` rows."""
    *lead, blocks, quads, _ = values.shape
    v = values.reshape(*lead, blocks, quads, ROW_BLOCK, 4).swapaxes(-3, -2)
    v = v.reshape(*lead, blocks * ROW_BLOCK, quads * 4)[..., :rows, :]
    s = scales.swapaxes(-2, -1).reshape(*lead, blocks * ROW_BLOCK, scales.shape[-2])
    return v, s[..., :rows, :]


def _matrix(tensors: Mapping[str, Tensor], names: list[str], dtype: str,
            done: Callable[[str, int], None], row_major: bool = False,
            order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the [.., rows_i, n] tensors `names` along rows into the engine's padded
    layout (Q8_0 interleaved unless row_major), rows permuted by `order` (row i of the result
    is row order[i] of the concatenation; applied before Q8_0 interleaving). Packed tensors
    are decoded straight into the result a layer at a time (no float32 copy of a quantized
    matrix); arrays and QTensors are copied in."""
    parts = [tensors[name] for name in names]

    def one(tensor: str) -> None:  # a Packed reports each tensor of the file it decodes
        done(tensor, 1)

    n = parts[0].shape[-1]
    n_pad = padded(n, dtype)
    lead = parts[0].shape[:-2]
    rows = sum(p.shape[-2] for p in parts)
    if dtype == "f32":
        out = np.zeros((*lead, rows, n_pad), np.float32)
        r = 0
        for name, p in zip(names, parts, strict=True):
            k = p.shape[-2]
            if isinstance(p, Packed):
                p.into_f32(out[..., r:r + k, :], one)
            else:
                out[..., r:r + k, :n] = _as_float(p)
                done(name, _count(p))
            r += k
        if order is not None:
            _reorder_rows(out, order)
        return out, np.zeros((*lead, rows, 0), np.float32)  # no scales, but indexable
    values = np.full((*lead, rows, n_pad), 128, np.uint8)
    scales = np.zeros((*lead, rows, n_pad // GROUP_SIZE), np.float32)
    r = 0
    for name, p in zip(names, parts, strict=True):
        k = p.shape[-2]
        if isinstance(p, Packed):
            p.into_q8_0(values[..., r:r + k, :], scales[..., r:r + k, :], one)
        else:
            q = p if isinstance(p, QTensor) else quantize_q8_0(p)
            values[..., r:r + k, :n] = (q.values.astype(np.int16) + 128).astype(np.uint8)
            scales[..., r:r + k, :n_groups(n)] = q.scales
            done(name, _count(p))
        r += k
    if order is not None:
        _reorder_rows(values, order)
        _reorder_rows(scales, order)
    return (values, scales) if row_major else interleave(values, scales)


def _reorder_rows(a: np.ndarray, order: np.ndarray) -> None:
    """a (..., rows, n)[..., i, :] = a[..., order[i], :] in place, one layer's copy at a time."""
    if a.ndim == 2:
        a[:] = a[order]
        return
    for layer in range(a.shape[0]):
        a[layer] = a[layer][order]


def build_weights(config: ModelConfig, tensors: Mapping[str, Tensor], dtype: str,
                  progress: Progress | None = None) -> Weights:
    """Named checkpoint tensors (engine/llama2c.py names) -> Weights in the engine layout.

    `progress` is called after each tensor of the file (a layer's matrix) is converted."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    t = tensors
    matrices = ["classifier" if "classifier" in t else "token_embedding", "wq", "wk", "wv",
                "wo", "w1", "w3", "w2"]
    if "classifier" in t:
        matrices.append("token_embedding")
    total = sum(_count(t[name]) for name in matrices)
    n_done = 0

    def done(name: str, k: int) -> None:
        nonlocal n_done
        n_done += k
        if progress is not None:
            progress(n_done, total, name)

    classifier, classifier_scales = _matrix(t, matrices[:1], dtype, done)
    if "classifier" in t:
        embedding, embedding_scales = _matrix(t, ["token_embedding"], dtype, done,
                                              row_major=True)
    else:
        embedding, embedding_scales = classifier, classifier_scales
    # NEOX models: q/k rows reordered (qk_order) before the Q8_0 interleaving
    order = qk_order(config) if config.rope_neox else None
    wqkv, wqkv_s = _matrix(t, ["wq", "wk", "wv"], dtype, done, order=order)
    wo, wo_s = _matrix(t, ["wo"], dtype, done)
    w13, w13_s = _matrix(t, ["w1", "w3"], dtype, done)
    w2, w2_s = _matrix(t, ["w2"], dtype, done)
    cos, sin = rope_tables(config)
    L = config.n_layers
    bqkv = (np.concatenate([_as_float(t[n]) for n in ("bq", "bk", "bv")], axis=1)
            if "bq" in t else np.zeros((L, 0), np.float32))
    # NOTE: two arrays, not one twice: the weight cache stores an aliased field only once
    q_norm, k_norm = ((np.array(_as_float(t["q_norm"])), np.array(_as_float(t["k_norm"])))
                      if "q_norm" in t else (np.zeros((L, 0), np.float32),
                                             np.zeros((L, 0), np.float32)))
    if order is not None:
        if bqkv.size:
            bqkv = bqkv[:, order]
        if q_norm.size:
            head = order[:config.head_dim]
            q_norm, k_norm = q_norm[:, head], k_norm[:, head]
    weights = Weights(
        embedding=embedding, embedding_scales=embedding_scales,
        attn_norm=np.array(_as_float(t["attn_norm"])),
        wqkv=wqkv, wqkv_scales=wqkv_s, wo=wo, wo_scales=wo_s,
        ffn_norm=np.array(_as_float(t["ffn_norm"])),
        w13=w13, w13_scales=w13_s, w2=w2, w2_scales=w2_s,
        final_norm=np.array(_as_float(t["final_norm"])),
        classifier=classifier, classifier_scales=classifier_scales,
        rope_cos=cos, rope_sin=sin, bqkv=bqkv, q_norm=q_norm, k_norm=k_norm,
    )
    # Read-only for good, whatever the source file: a kernel that tried to write a weight would
    # not compile, and numba compiles one specialization of the step for every model.
    for array in weights:
        array.setflags(write=False)
    return weights


def qk_order(config: ModelConfig) -> np.ndarray:
    """Row order of wqkv for a rotate-halves (NEOX) model: within each q and k head, row 2i is
    the file's row i and row 2i+1 its row i + head_dim/2 (the inverse of convert_hf_to_gguf.py's
    permute); v rows stay. Pairwise RoPE on these rows is NEOX RoPE on the file's."""
    hd, half = config.head_dim, config.head_dim // 2
    head = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    n_qk = config.n_heads + config.n_kv_heads
    qk = (np.arange(n_qk)[:, None] * hd + head[None, :]).reshape(-1)
    return np.concatenate([qk, np.arange(n_qk * hd, n_qk * hd + config.kv_dim)])


def matrix_bytes(weights: Weights) -> int:
    """Bytes of weight matrices streamed by one forward step (embedding lookups excluded)."""
    names = ("wqkv", "wo", "w13", "w2", "classifier")
    total = 0
    for name in names:
        total += getattr(weights, name).nbytes + getattr(weights, name + "_scales").nbytes
    return total + weights.attn_norm.nbytes + weights.ffn_norm.nbytes


def dequantized(weights: Weights, config: ModelConfig) -> dict[str, np.ndarray]:
    """The float32 tensors the engine actually computes with, in checkpoint names (for tests)."""
    dim, kv, hidden, q = config.dim, config.kv_dim, config.hidden_dim, config.q_dim

    def unpack(values: np.ndarray, scales: np.ndarray, n: int, rows: int) -> np.ndarray:
        if values.dtype == np.float32:
            return values[..., :n].copy()
        if values is not weights.embedding or config.shared_classifier:
            values, scales = deinterleave(values, scales, rows)
        signed = (values.astype(np.int16) - 128).astype(np.int8)
        return dequantize_q8_0(signed, scales)[..., :n]

    vocab = config.vocab_size
    wqkv = unpack(weights.wqkv, weights.wqkv_scales, dim, q + 2 * kv)
    bqkv, q_norm, k_norm = weights.bqkv, weights.q_norm, weights.k_norm
    if config.rope_neox:  # back to the file's row order (after deinterleaving, in unpack)
        inverse = np.argsort(qk_order(config))
        wqkv = wqkv[:, inverse]
        bqkv = bqkv[:, inverse] if bqkv.size else bqkv
        if q_norm.size:
            head = inverse[:config.head_dim]
            q_norm, k_norm = q_norm[:, head], k_norm[:, head]
    w13 = unpack(weights.w13, weights.w13_scales, dim, 2 * hidden)
    out = {
        "token_embedding": unpack(weights.embedding, weights.embedding_scales, dim, vocab),
        "attn_norm": weights.attn_norm, "ffn_norm": weights.ffn_norm,
        "final_norm": weights.final_norm,
        "wq": wqkv[:, :q], "wk": wqkv[:, q:q + kv], "wv": wqkv[:, q + kv:],
        "wo": unpack(weights.wo, weights.wo_scales, q, dim),
        "w1": w13[:, :hidden], "w3": w13[:, hidden:],
        "w2": unpack(weights.w2, weights.w2_scales, hidden, dim),
    }
    if not config.shared_classifier:
        out["classifier"] = unpack(weights.classifier, weights.classifier_scales, dim, vocab)
    if bqkv.size:
        out |= {"bq": bqkv[:, :q], "bk": bqkv[:, q:q + kv], "bv": bqkv[:, q + kv:]}
    if q_norm.size:
        out |= {"q_norm": q_norm, "k_norm": k_norm}
    return out

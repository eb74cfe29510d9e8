"""Numba kernels of the forward step: small functions over arrays with output arguments.

Each parallel loop (`prange`) writes disjoint outputs and every output element is computed by
one thread in a fixed order, so results do not depend on the thread count or the batch.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .config import GROUP_SIZE
from .kvcache import KV_BLOCK
from .simd import make_tile

TILE_ROWS = 4
TILE_COLS = 4

_tile = make_tile(TILE_ROWS, TILE_COLS)
_tile_col = make_tile(TILE_ROWS, 1)
_tile_one = make_tile(1, 1)

_opts: dict[str, Any] = {"nogil": True, "cache": True}


def is_q8(a) -> bool:
    """True for the int8/uint8 arrays of the Q8_0 path; a compile-time constant inside kernels."""
    return a.dtype in (np.int8, np.uint8)


@overload(is_q8)
def _is_q8(a):
    answer = isinstance(a, types.Array) and a.dtype in (types.int8, types.uint8)
    return lambda a: answer


@njit(parallel=True, **_opts)
def linear(out, x, xs, xc, w, ws):
    """out (T, d) = x (T, n) @ w (d, n).T  -- Q8_0 (x int8 with scales xs and corrections xc,
    w uint8+128 with scales ws) or f32 (xs, xc, ws unused).

    Weight rows are read once per call: a tile keeps TILE_ROWS rows in registers for TILE_COLS
    activation rows at a time.
    """
    T = x.shape[0]
    d = w.shape[0]
    n_blocks = (d + TILE_ROWS - 1) // TILE_ROWS
    for blk in prange(n_blocks):
        r0 = blk * TILE_ROWS
        if r0 + TILE_ROWS <= d:
            b0 = 0
            while b0 + TILE_COLS <= T:
                _tile(out, x, xs, xc, w, ws, r0, b0)
                b0 += TILE_COLS
            while b0 < T:
                _tile_col(out, x, xs, xc, w, ws, r0, b0)
                b0 += 1
        else:
            for r in range(r0, d):
                for b in range(T):
                    _tile_one(out, x, xs, xc, w, ws, r, b)


# 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude < 2**22 to the nearest
# integer, ties to even -- np.rint's result, without a libm call per element (it vectorizes).
_ROUND = np.float32(12582912.0)


@njit(nogil=True, cache=True, fastmath=True)
def _amax(x):
    """max |x| of a group. fastmath lets LLVM vectorize it; a max is exact in any order."""
    m = np.float32(0.0)
    for j in range(x.shape[0]):
        a = abs(x[j])
        m = a if a > m else m
    return m


@njit(**_opts)
def _round_group(q, x, inv):
    """q (len(x),) int8 = rint(x * inv)"""
    for j in range(x.shape[0]):
        q[j] = np.int8(np.int32((x[j] * inv + _ROUND) - _ROUND))


@njit(**_opts)
def _quantize_row(x, q, s):
    """x f32 (n,) -> q int8 (n_pad,), s f32 (n_pad/32,), zero beyond n (engine.quant's rule)."""
    n = x.shape[0]
    for g in range(s.shape[0]):
        lo = g * GROUP_SIZE
        hi = min(lo + GROUP_SIZE, n)
        if hi <= lo:  # a pad group
            q[lo:lo + GROUP_SIZE] = 0
            s[g] = 0
            continue
        amax = _amax(x[lo:hi])
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        _round_group(q[lo:hi], x[lo:hi], inv)
        q[hi:lo + GROUP_SIZE] = 0
        s[g] = amax / np.float32(127.0)


@njit(**_opts)
def _corrections(q, c):
    """c (n_pad/4,) int32 = -128 * sum of each 4 consecutive q: cancels the weights' +128."""
    for k in range(c.shape[0]):
        c[k] = -128 * (np.int32(q[4 * k]) + np.int32(q[4 * k + 1]) + np.int32(q[4 * k + 2])
                       + np.int32(q[4 * k + 3]))


@njit(**_opts)
def _load_row(v, xa, xs, xc):
    """One row of matmul input: quantized (int8 xa, scales xs, corrections xc) or f32 padded."""
    if is_q8(xa):
        _quantize_row(v, xa, xs)
        _corrections(xa, xc)
    else:
        n = v.shape[0]
        xa[:n] = v
        xa[n:] = 0


@njit(**_opts)
def rmsnorm_row(out, x, w, eps):
    """out (n,) = x / sqrt(mean(x^2) + eps) * w"""
    n = x.shape[0]
    ss = np.float32(0.0)
    for j in range(n):
        ss += x[j] * x[j]
    inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + eps))
    for j in range(n):
        out[j] = w[j] * (inv * x[j])


@njit(parallel=True, **_opts)
def load_activations(x, xa, xs, xc):
    """Matmul input from x (T, n): see _load_row."""
    for t in prange(x.shape[0]):
        _load_row(x[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def norm_load(xb, x, w, eps, xa, xs, xc):
    """xb = rmsnorm(x) * w, then loaded as matmul input (one parallel region for both)."""
    for t in prange(x.shape[0]):
        rmsnorm_row(xb[t], x[t], w, eps)
        _load_row(xb[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def add_norm_load(x, y, xb, w, eps, xa, xs, xc):
    """x += y (the residual add), then norm_load of the new x."""
    for t in prange(x.shape[0]):
        row = x[t]
        row += y[t]
        rmsnorm_row(xb[t], row, w, eps)
        _load_row(xb[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def embed(x, tokens, emb, emb_scales):
    """x (T, dim) = rows of the embedding (Q8_0 rows are dequantized: (u8 - 128) * scale)."""
    T, dim = x.shape
    for t in prange(T):
        tok = tokens[t]
        for j in range(dim):
            if is_q8(emb):
                x[t, j] = np.float32(np.int32(emb[tok, j]) - 128) * emb_scales[tok, j // GROUP_SIZE]
            else:
                x[t, j] = emb[tok, j]


@njit(parallel=True, **_opts)
def add_rows(x, b):
    """x (T, n) += b (n,): a bias on every row"""
    T, n = x.shape
    for t in prange(T):
        for j in range(n):
            x[t, j] += b[j]


@njit(parallel=True, **_opts)
def head_norms(qkv, q_w, k_w, n_heads, n_kv_heads, head_dim, eps):
    """RMSNorm of each q head (weights q_w (head_dim,)) and k head (k_w) of qkv (T, q + 2 kv),
    in place (rmsnorm_row reads a value before it writes it)."""
    for t in prange(qkv.shape[0]):
        for h in range(n_heads + n_kv_heads):
            v = qkv[t, h * head_dim:(h + 1) * head_dim]
            rmsnorm_row(v, v, q_w if h < n_heads else k_w, eps)


@njit(**_opts)
def _rope_row(v, p, cos, sin, n_heads, head_dim):
    """Rotate n_heads heads at the start of v (pairwise, llama2.c's convention) to position p."""
    for h in range(n_heads):
        base = h * head_dim
        for i in range(head_dim // 2):
            c = cos[p, i]
            s = sin[p, i]
            v0 = v[base + 2 * i]
            v1 = v[base + 2 * i + 1]
            v[base + 2 * i] = v0 * c - v1 * s
            v[base + 2 * i + 1] = v0 * s + v1 * c


@njit(parallel=True, **_opts)
def rope_store_kv(qkv, positions, cos, sin, n_heads, n_kv_heads, head_dim, k_cache, v_cache,
                  layer, seq_index, block_tables):
    """rope, then each token's k and v into its sequence's cache block."""
    dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    for t in prange(qkv.shape[0]):
        p = positions[t]
        _rope_row(qkv[t], p, cos, sin, n_heads + n_kv_heads, head_dim)
        blk = block_tables[seq_index[t], p // KV_BLOCK]
        k_cache[layer, blk, p % KV_BLOCK, :] = qkv[t, dim:dim + kv_dim]
        v_cache[layer, blk, p % KV_BLOCK, :] = qkv[t, dim + kv_dim:dim + 2 * kv_dim]


@njit(nogil=True, cache=True, fastmath=True)
def _dot(a, b):
    """a (n,) . b (n,); one compiled summation order for every call, so still batch-invariant."""
    total = np.float32(0.0)
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


@njit(nogil=True, cache=True, fastmath=True)
def _axpy(y, a, x):
    """y (n,) += a * x (n,)"""
    for i in range(y.shape[0]):
        y[i] += a * x[i]


@njit(parallel=True, **_opts)
def attention(out, qkv, k_cache, v_cache, layer, positions, seq_index, block_tables,
              n_heads, n_kv_heads, head_dim, scratch):
    """out (T, dim): causal grouped-query attention of each token over its sequence's cache.

    scratch (n_threads, max_seq_len) f32 holds one thread's attention scores.
    """
    T = qkv.shape[0]
    kv_mul = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for th in prange(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        att = scratch[numba.get_thread_id()]
        n_pos = positions[t] + 1
        table = block_tables[seq_index[t]]
        q0 = h * head_dim
        k0 = (h // kv_mul) * head_dim
        q = qkv[t, q0:q0 + head_dim]
        top = -np.inf
        for p in range(n_pos):
            score = _dot(q, k_cache[layer, table[p // KV_BLOCK], p % KV_BLOCK, k0:k0 + head_dim])
            score *= scale
            att[p] = score
            top = max(top, score)
        total = np.float32(0.0)
        for p in range(n_pos):
            e = np.float32(math.exp(att[p] - top))
            att[p] = e
            total += e
        o = out[t, q0:q0 + head_dim]
        o[:] = 0
        for p in range(n_pos):
            _axpy(o, att[p] / total,
                  v_cache[layer, table[p // KV_BLOCK], p % KV_BLOCK, k0:k0 + head_dim])


@njit(**_opts)
def _swiglu_row(out, h13):
    """out (hidden,) = silu(h1) * h3 where h13 (2 hidden,) holds [h1 | h3]."""
    hidden = out.shape[0]
    for j in range(hidden):
        a = h13[j]
        out[j] = a * (np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-a)))) \
            * h13[hidden + j]


@njit(parallel=True, **_opts)
def swiglu_load(hact, h13, xa, xs, xc):
    """hact = swiglu(h13) row by row, then loaded as the w2 matmul input."""
    for t in prange(h13.shape[0]):
        _swiglu_row(hact[t], h13[t])
        _load_row(hact[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def add_into(x, y):
    """x (T, n) += y (T, n)"""
    T, n = x.shape
    for t in prange(T):
        for j in range(n):
            x[t, j] += y[t, j]

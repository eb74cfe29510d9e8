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
from .simd import (
    ROW_BLOCK,
    bf16_weights,
    exp_sum,
    make_qtile,
    make_scores,
    make_tile,
    make_weighted_sum,
    scale_max,
    to_bf16,
)

TILE_ROWS = 4  # f32 tiles: weight rows x activation rows
TILE_COLS = 4
Q8_BLOCKS = 4  # Q8_0 tiles: 16-row blocks x activation rows (29 of 32 zmm registers)
Q8_COLS = 3

_tile = make_tile(TILE_ROWS, TILE_COLS)
_tile_col = make_tile(TILE_ROWS, 1)
_tile_one = make_tile(1, 1)
_qtile = make_qtile(Q8_BLOCKS, Q8_COLS)
_qtile_col = make_qtile(Q8_BLOCKS, 1)
_qtile_row = make_qtile(1, Q8_COLS)
_qtile_one = make_qtile(1, 1)

_opts: dict[str, Any] = {"nogil": True, "cache": True}


def is_q8(a) -> bool:
    """True for the int8/uint8 arrays of the Q8_0 path; a compile-time constant inside kernels."""
    return a.dtype in (np.int8, np.uint8)


@overload(is_q8)
def _is_q8(a):
    answer = isinstance(a, types.Array) and a.dtype in (types.int8, types.uint8)
    return lambda a: answer


@njit(**_opts)
def _q8_blocks(out, x, xs, xc, w, ws, rb0, n_blocks):
    """The Q8_0 tiles of blocks rb0..rb0+n_blocks-1 (n_blocks is Q8_BLOCKS, or fewer at the
    end of the matrix) for every activation row."""
    T = x.shape[0]
    if n_blocks == Q8_BLOCKS:
        b0 = 0
        while b0 + Q8_COLS <= T:
            _qtile(out, x, xs, xc, w, ws, rb0, b0)
            b0 += Q8_COLS
        while b0 < T:
            _qtile_col(out, x, xs, xc, w, ws, rb0, b0)
            b0 += 1
    else:
        for rb in range(rb0, rb0 + n_blocks):
            b0 = 0
            while b0 + Q8_COLS <= T:
                _qtile_row(out, x, xs, xc, w, ws, rb, b0)
                b0 += Q8_COLS
            while b0 < T:
                _qtile_one(out, x, xs, xc, w, ws, rb, b0)
                b0 += 1


@njit(parallel=True, **_opts)
def linear(out, x, xs, xc, w, ws):
    """out (T, d) = x (T, n) @ w.T  -- Q8_0 (x int8 with scales xs and group corrections xc,
    w uint8+128 interleaved (d16/16, n/4, 64) with scales ws (d16/16, n/32, 16), see
    engine/simd.py) or f32 (w (d, n); xs, xc, ws unused).

    Weight rows are read once per call: a tile keeps its weight rows in registers for several
    activation rows at a time.
    """
    T = x.shape[0]
    d = out.shape[1]
    if is_q8(w):
        n_rb = w.shape[0]
        for item in prange((n_rb + Q8_BLOCKS - 1) // Q8_BLOCKS):
            rb0 = item * Q8_BLOCKS
            _q8_blocks(out, x, xs, xc, w, ws, rb0, min(Q8_BLOCKS, n_rb - rb0))
    else:
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
    """c (n_pad/32,) int32 = -128 * sum of each group of q: cancels the weights' +128."""
    for g in range(c.shape[0]):
        total = np.int32(0)
        for k in range(g * GROUP_SIZE, (g + 1) * GROUP_SIZE):
            total += np.int32(q[k])
        c[g] = -128 * total


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


# NOTE: row-wise kernels run serially below this many rows (decode steps): their work is then
# a few microseconds, less than a parallel region's fork and join barrier, which on a busy
# machine can also wait for a descheduled worker. Each row is the same code either way.
PARALLEL_ROWS = 8


@njit(**_opts)
def _norm_load_row(xb, x, w, eps, xa, xs, xc):
    rmsnorm_row(xb, x, w, eps)
    _load_row(xb, xa, xs, xc)


@njit(**_opts)
def _add_norm_load_row(x, y, xb, w, eps, xa, xs, xc):
    x += y
    rmsnorm_row(xb, x, w, eps)
    _load_row(xb, xa, xs, xc)


@njit(parallel=True, **_opts)
def _load_activations_par(x, xa, xs, xc):
    for t in prange(x.shape[0]):
        _load_row(x[t], xa[t], xs[t], xc[t])


@njit(**_opts)
def load_activations(x, xa, xs, xc):
    """Matmul input from x (T, n): see _load_row."""
    if x.shape[0] >= PARALLEL_ROWS:
        _load_activations_par(x, xa, xs, xc)
    else:
        for t in range(x.shape[0]):
            _load_row(x[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def _norm_load_par(xb, x, w, eps, xa, xs, xc):
    for t in prange(x.shape[0]):
        _norm_load_row(xb[t], x[t], w, eps, xa[t], xs[t], xc[t])


@njit(**_opts)
def norm_load(xb, x, w, eps, xa, xs, xc):
    """xb = rmsnorm(x) * w, then loaded as matmul input (one parallel region for both)."""
    if x.shape[0] >= PARALLEL_ROWS:
        _norm_load_par(xb, x, w, eps, xa, xs, xc)
    else:
        for t in range(x.shape[0]):
            _norm_load_row(xb[t], x[t], w, eps, xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def _add_norm_load_par(x, y, xb, w, eps, xa, xs, xc):
    for t in prange(x.shape[0]):
        _add_norm_load_row(x[t], y[t], xb[t], w, eps, xa[t], xs[t], xc[t])


@njit(**_opts)
def add_norm_load(x, y, xb, w, eps, xa, xs, xc):
    """x += y (the residual add), then norm_load of the new x."""
    if x.shape[0] >= PARALLEL_ROWS:
        _add_norm_load_par(x, y, xb, w, eps, xa, xs, xc)
    else:
        for t in range(x.shape[0]):
            _add_norm_load_row(x[t], y[t], xb[t], w, eps, xa[t], xs[t], xc[t])


def in_width(w):
    """The padded input width n of one weight matrix, whatever its layout."""
    return w.shape[1] * 4 if w.ndim == 3 else w.shape[1]


@overload(in_width)
def _in_width(w):
    if w.ndim == 3:  # Q8_0 interleaved: (rows16/16, n/4, 64)
        return lambda w: w.shape[1] * 4
    return lambda w: w.shape[1]


def embedding_value(emb, scales, tok, j):
    """Element (tok, j) of an embedding in any of the engine's layouts, as float32."""
    raise NotImplementedError("only inside kernels")


@overload(embedding_value)
def _embedding_value(emb, scales, tok, j):
    if emb.dtype == types.float32:
        return lambda emb, scales, tok, j: emb[tok, j]
    if emb.ndim == 3:  # interleaved: the classifier's layout
        def interleaved(emb, scales, tok, j):
            rb, i = tok // ROW_BLOCK, tok % ROW_BLOCK
            return (np.float32(np.int32(emb[rb, j // 4, 4 * i + j % 4]) - 128)
                    * scales[rb, j // GROUP_SIZE, i])
        return interleaved
    return lambda emb, scales, tok, j: (np.float32(np.int32(emb[tok, j]) - 128)
                                        * scales[tok, j // GROUP_SIZE])


@njit(parallel=True, **_opts)
def embed(x, tokens, emb, emb_scales):
    """x (T, dim) = rows of the embedding (Q8_0 rows are dequantized: (u8 - 128) * scale),
    row-major (vocab, n) or interleaved (vocab16/16, n/4, 64) when it is the classifier."""
    T, dim = x.shape
    for t in prange(T):
        tok = tokens[t]
        for j in range(dim):
            x[t, j] = embedding_value(emb, emb_scales, tok, j)


@njit(**_opts)
def _head_norms_row(v, q_w, k_w, n_heads, n_kv_heads, head_dim, eps):
    for h in range(n_heads + n_kv_heads):
        head = v[h * head_dim:(h + 1) * head_dim]
        rmsnorm_row(head, head, q_w if h < n_heads else k_w, eps)


@njit(parallel=True, **_opts)
def _add_rows_par(x, b):
    for t in prange(x.shape[0]):
        x[t] += b


@njit(**_opts)
def add_rows(x, b):
    """x (T, n) += b (n,): a bias on every row (serial below PARALLEL_ROWS rows)"""
    if x.shape[0] >= PARALLEL_ROWS:
        _add_rows_par(x, b)
    else:
        for t in range(x.shape[0]):
            x[t] += b


@njit(parallel=True, **_opts)
def _head_norms_par(qkv, q_w, k_w, n_heads, n_kv_heads, head_dim, eps):
    for t in prange(qkv.shape[0]):
        _head_norms_row(qkv[t], q_w, k_w, n_heads, n_kv_heads, head_dim, eps)


@njit(**_opts)
def head_norms(qkv, q_w, k_w, n_heads, n_kv_heads, head_dim, eps):
    """RMSNorm of each q head (weights q_w (head_dim,)) and k head (k_w) of qkv (T, q + 2 kv),
    in place (rmsnorm_row reads a value before it writes it); serial below PARALLEL_ROWS rows."""
    if qkv.shape[0] >= PARALLEL_ROWS:
        _head_norms_par(qkv, q_w, k_w, n_heads, n_kv_heads, head_dim, eps)
    else:
        for t in range(qkv.shape[0]):
            _head_norms_row(qkv[t], q_w, k_w, n_heads, n_kv_heads, head_dim, eps)


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


# KV cache types: float32 arrays, or bfloat16 held as uint16 in the layouts vdpbf16ps reads
# (engine/kvcache.py): keys (L, blocks, kv_dim / 2, KV_BLOCK, 2), values (L, blocks,
# KV_BLOCK / 2, kv_dim, 2). The helpers below pick their body by the cache's dtype when numba
# compiles the caller.


def store_k(k_cache, layer, blk, slot, k):
    """k (kv_dim,) float32 into position `slot` of block blk."""


@overload(store_k)
def _store_k(k_cache, layer, blk, slot, k):
    if k_cache.dtype == types.uint16:
        def bf16(k_cache, layer, blk, slot, k):
            for d in range(k.shape[0]):
                k_cache[layer, blk, d // 2, slot, d % 2] = to_bf16(k[d])  # type: ignore[call-arg]
        return bf16

    def f32(k_cache, layer, blk, slot, k):
        k_cache[layer, blk, :, slot] = k
    return f32


def store_v(v_cache, layer, blk, slot, v):
    """v (kv_dim,) float32 into position `slot` of block blk."""


@overload(store_v)
def _store_v(v_cache, layer, blk, slot, v):
    if v_cache.dtype == types.uint16:
        def bf16(v_cache, layer, blk, slot, v):
            for d in range(v.shape[0]):
                v_cache[layer, blk, slot // 2, d, slot % 2] = to_bf16(v[d])  # type: ignore[call-arg]
        return bf16

    def f32(v_cache, layer, blk, slot, v):
        v_cache[layer, blk, slot, :] = v
    return f32


def store_q(k_cache, qb, q):
    """With bfloat16 keys, a token's queries q (q_dim,) as bfloat16 into qb (q_dim,) uint16,
    what the scores read; with float32 keys nothing (they read qkv)."""


@overload(store_q)
def _store_q(k_cache, qb, q):
    if k_cache.dtype == types.uint16:
        def bf16(k_cache, qb, q):
            for d in range(q.shape[0]):
                qb[d] = to_bf16(q[d])  # type: ignore[call-arg]
        return bf16
    return lambda k_cache, qb, q: None


def queries(k_cache, qkv, qb):
    """Where the scores read queries: qkv (float32 keys) or qb (bfloat16 keys)."""


@overload(queries)
def _queries(k_cache, qkv, qb):
    if k_cache.dtype == types.uint16:
        return lambda k_cache, qkv, qb: qb
    return lambda k_cache, qkv, qb: qkv


def pair_positions(v_cache) -> int:
    """Positions a weighted-sum step takes together: 2 for bfloat16 values, else 1."""
    return 2 if v_cache.dtype == np.uint16 else 1


@overload(pair_positions)
def _pair_positions(v_cache):
    n = 2 if v_cache.dtype == types.uint16 else 1
    return lambda v_cache: n


@njit(**_opts)
def _rope_store_row(qkv, qb, t, positions, cos, sin, n_heads, n_kv_heads, head_dim, k_cache,
                    v_cache, layer, seq_index, block_tables):
    dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    p = positions[t]
    _rope_row(qkv[t], p, cos, sin, n_heads + n_kv_heads, head_dim)
    blk = block_tables[seq_index[t], p // KV_BLOCK]
    store_q(k_cache, qb[t], qkv[t, :dim])
    store_k(k_cache, layer, blk, p % KV_BLOCK, qkv[t, dim:dim + kv_dim])
    store_v(v_cache, layer, blk, p % KV_BLOCK, qkv[t, dim + kv_dim:dim + 2 * kv_dim])


@njit(parallel=True, **_opts)
def _rope_store_kv_par(qkv, qb, positions, cos, sin, n_heads, n_kv_heads, head_dim, k_cache,
                       v_cache, layer, seq_index, block_tables):
    for t in prange(qkv.shape[0]):
        _rope_store_row(qkv, qb, t, positions, cos, sin, n_heads, n_kv_heads, head_dim,
                        k_cache, v_cache, layer, seq_index, block_tables)


@njit(**_opts)
def rope_store_kv(qkv, qb, positions, cos, sin, n_heads, n_kv_heads, head_dim, k_cache,
                  v_cache, layer, seq_index, block_tables):
    """rope, then each token's k and v into its sequence's cache block, and with bfloat16 keys
    its queries as bfloat16 into qb (T, q_dim) (serial below PARALLEL_ROWS rows)."""
    if qkv.shape[0] >= PARALLEL_ROWS:
        _rope_store_kv_par(qkv, qb, positions, cos, sin, n_heads, n_kv_heads, head_dim,
                           k_cache, v_cache, layer, seq_index, block_tables)
    else:
        for t in range(qkv.shape[0]):
            _rope_store_row(qkv, qb, t, positions, cos, sin, n_heads, n_kv_heads, head_dim,
                            k_cache, v_cache, layer, seq_index, block_tables)


@njit(nogil=True, cache=True, fastmath=True)
def _axpy(y, a, x):
    """y (n,) += a * x (n,)"""
    for i in range(y.shape[0]):
        y[i] += a * x[i]


SCORE_BLOCKS = 4  # KV blocks scored together: independent fma chains
ATT_ROWS = 4  # query rows that share each key and value load (registers: 4 x 4 chains)
RUN_TOKENS = 4  # consecutive tokens of a sequence in one work item of the parallel loop

_scores_blocks = make_scores(SCORE_BLOCKS)
_scores_block = make_scores(1)
# attention's weighted sums of values, 64 or 32 lanes of a head per pass
_wsum64 = make_weighted_sum(4)
_wsum32 = make_weighted_sum(2)
_wsum16 = make_weighted_sum(1)


@njit(**_opts)
def _scores(atts, qs, k_cache, layer, table, n_blocks, k0):
    """atts[r][:16 n_blocks] = qs[r] . k for every position of the sequence's first n_blocks
    blocks, for each row r of the tuples.

    Each score is the same fma chain over the head's dimensions whichever call computes it
    (engine/simd.py), so it depends neither on the batch, the chunking nor the rows scored
    with it; lanes past a row's end are computed from stale cache rows and ignored.
    """
    b = 0
    while b + SCORE_BLOCKS <= n_blocks:
        _scores_blocks(atts, qs, k_cache, layer, table, b, k0)
        b += SCORE_BLOCKS
    while b < n_blocks:
        _scores_block(atts, qs, k_cache, layer, table, b, k0)
        b += 1


def normalize(w, att, n, total):
    """The weights of att[:n] (exp'd) over total into w: float32 in place (w is att), or
    bfloat16 (w uint16, att's float32 quotients rounded; simd.bf16_weights)."""


@overload(normalize)
def _normalize(w, att, n, total):
    if w.dtype == types.uint16:
        return lambda w, att, n, total: bf16_weights(w, att, n, total)  # type: ignore[call-arg]

    def f32(w, att, n, total):
        for p in range(n):
            att[p] = att[p] / total
    return f32


@njit(**_opts)
def _softmax(w, att, n, scale):
    """w[:n] = softmax(scale * att[:n]) (att overwritten; w may be att: `normalize`)"""
    top = scale_max(att, n, scale)  # type: ignore[call-arg, var-annotated]
    total = exp_sum(att, n, top)
    normalize(w, att, n, total)


@njit(**_opts)
def _weighted_values(os, ws, v_cache, layer, table, p0, p1, k0):
    """os[r] += sum over p0 <= p < p1 of ws[r][p] * the value at position p, in order, for
    each row r of the tuples (head widths that are multiples of 32, or of 16 with bfloat16
    values: `vector_width`)."""
    hd = os[0].shape[0]
    if hd % 64 == 0:
        for c in range(0, hd, 64):
            _wsum64(tuple_slices(os, c, c + 64), ws, v_cache, layer, table, p0, p1, k0 + c)
    elif hd % 32 == 0:
        for c in range(0, hd, 32):
            _wsum32(tuple_slices(os, c, c + 32), ws, v_cache, layer, table, p0, p1, k0 + c)
    else:
        for c in range(0, hd, 16):
            _wsum16(tuple_slices(os, c, c + 16), ws, v_cache, layer, table, p0, p1, k0 + c)


def vector_width(v_cache, head_dim) -> bool:
    """Whether attention runs on the vector kernels (simd.py) for this head width: multiples
    of 32, and of 16 with bfloat16 values (which have no plain-numba path)."""
    return head_dim % 32 == 0 or (v_cache.dtype == np.uint16 and head_dim % 16 == 0)


@overload(vector_width)
def _vector_width(v_cache, head_dim):
    bf16 = v_cache.dtype == types.uint16
    return lambda v_cache, head_dim: head_dim % 32 == 0 or (bf16 and head_dim % 16 == 0)


def tuple_slices(arrays, a, b):
    """tuple(x[a:b] for x in arrays) inside kernels."""
    return tuple(x[a:b] for x in arrays)


@overload(tuple_slices)
def _tuple_slices(arrays, a, b):
    if arrays.count == 1:
        return lambda arrays, a, b: (arrays[0][a:b],)
    if arrays.count == ATT_ROWS:
        return lambda arrays, a, b: (arrays[0][a:b], arrays[1][a:b], arrays[2][a:b],
                                     arrays[3][a:b])
    return None


@njit(**_opts)
def _attend_rows(out, qs, att, wts, k_cache, v_cache, table, layer, ts, hs, ns, k0, head_dim,
                 scale):
    """ATT_ROWS query rows (token ts[r], head hs[r], ns[r] positions, ns ascending) of one
    sequence and KV head: scores and weighted values share each key and value load; a row's
    arithmetic is _attend_row's."""
    q = (qs[ts[0], hs[0] * head_dim:(hs[0] + 1) * head_dim],
         qs[ts[1], hs[1] * head_dim:(hs[1] + 1) * head_dim],
         qs[ts[2], hs[2] * head_dim:(hs[2] + 1) * head_dim],
         qs[ts[3], hs[3] * head_dim:(hs[3] + 1) * head_dim])
    o = (out[ts[0], hs[0] * head_dim:(hs[0] + 1) * head_dim],
         out[ts[1], hs[1] * head_dim:(hs[1] + 1) * head_dim],
         out[ts[2], hs[2] * head_dim:(hs[2] + 1) * head_dim],
         out[ts[3], hs[3] * head_dim:(hs[3] + 1) * head_dim])
    a = (att[0], att[1], att[2], att[3])
    w = (wts[0], wts[1], wts[2], wts[3])
    _scores(a, q, k_cache, layer, table, (ns[3] + KV_BLOCK - 1) // KV_BLOCK, k0)
    for r in range(ATT_ROWS):
        _softmax(wts[r], att[r], ns[r], scale)
        out[ts[r], hs[r] * head_dim:(hs[r] + 1) * head_dim] = 0
    # NOTE: together up to where every row goes, on a whole pair of positions with bfloat16
    # values; then each row's own last positions, one row at a time
    common = ns[0] - ns[0] % pair_positions(v_cache)
    _weighted_values(o, w, v_cache, layer, table, 0, common, k0)
    for r in range(ATT_ROWS):
        if ns[r] > common:
            _weighted_values((o[r],), (w[r],), v_cache, layer, table, common, ns[r], k0)


def plain_values(o, w, v_cache, table, layer, n_pos, k0):
    """o += the weighted values in plain numba (head widths not a multiple of 32; float32
    values only: the engine refuses bfloat16 ones for widths that are not multiples of 16)."""


@overload(plain_values)
def _plain_values(o, w, v_cache, table, layer, n_pos, k0):
    if v_cache.dtype == types.uint16:
        def refuse(o, w, v_cache, table, layer, n_pos, k0):
            raise ValueError("bfloat16 values need a head width that is a multiple of 16")
        return refuse

    def f32(o, w, v_cache, table, layer, n_pos, k0):
        hd = o.shape[0]
        for p in range(n_pos):
            _axpy(o, w[p], v_cache[layer, table[p // KV_BLOCK], p % KV_BLOCK, k0:k0 + hd])
    return f32


@njit(**_opts)
def _attend_row(o, q, att, w, k_cache, v_cache, table, layer, n_pos, k0, scale):
    """o (head_dim,) = one query row's attention over its sequence's first n_pos positions."""
    _scores((att,), (q,), k_cache, layer, table, (n_pos + KV_BLOCK - 1) // KV_BLOCK, k0)
    _softmax(w, att, n_pos, scale)
    o[:] = 0
    if vector_width(v_cache, o.shape[0]):
        _weighted_values((o,), (w,), v_cache, layer, table, 0, n_pos, k0)
    else:  # other head widths: the same order, in plain numba
        plain_values(o, w, v_cache, table, layer, n_pos, k0)


@njit(**_opts)
def _runs(positions, seq_index):
    """Starts of the token runs (and T at the end): up to RUN_TOKENS consecutive tokens of one
    sequence at consecutive positions."""
    T = positions.shape[0]
    starts = np.empty(T + 1, np.int64)
    n = 0
    for t in range(T):
        if (t == 0 or t - starts[n - 1] >= RUN_TOKENS or seq_index[t] != seq_index[t - 1]
                or positions[t] != positions[t - 1] + 1):
            starts[n] = t
            n += 1
    starts[n] = T
    return starts[:n + 1]


@njit(parallel=True, **_opts)
def attention(out, qkv, qb, k_cache, v_cache, layer, positions, seq_index, block_tables,
              n_heads, n_kv_heads, head_dim, scratch, wscratch):
    """out (T, dim): causal grouped-query attention of each token over its sequence's cache.

    float32 caches: k_cache (L, blocks, kv_dim, KV_BLOCK) (transposed blocks), v_cache (L,
    blocks, KV_BLOCK, kv_dim); bfloat16 ones in the layouts of store_k / store_v, with the
    queries as bfloat16 in qb (rope_store_kv wrote them). scratch (n_threads, ATT_ROWS,
    max_seq_len rounded up to 32) f32 holds one thread's attention scores, wscratch its
    weights: the same array with float32 values, uint16 of that shape with bfloat16 ones.
    """
    kv_mul = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    runs = _runs(positions, seq_index)
    n_runs = runs.shape[0] - 1
    qs = queries(k_cache, qkv, qb)
    # NOTE: a work item is a run of a sequence's tokens and one KV head; its query rows (each
    # token x the heads that share that KV head) go ATT_ROWS at a time, so a prompt chunk's
    # tokens, or a decode token's grouped heads, read each key and value once per ATT_ROWS
    # rows rather than once per row. KV heads outer: a thread's share is whole heads, and a
    # decode batch's uneven lengths split evenly between the threads.
    for item in prange(n_runs * n_kv_heads):
        g = item // n_runs
        ta = runs[item % n_runs]
        n_rows = (runs[item % n_runs + 1] - ta) * kv_mul
        table = block_tables[seq_index[ta]]
        att = scratch[numba.get_thread_id()]
        wts = wscratch[numba.get_thread_id()]
        k0 = g * head_dim
        i = 0
        if vector_width(v_cache, head_dim):
            while i + ATT_ROWS <= n_rows:
                rt = (ta + i // kv_mul, ta + (i + 1) // kv_mul, ta + (i + 2) // kv_mul,
                      ta + (i + 3) // kv_mul)
                rh = (g * kv_mul + i % kv_mul, g * kv_mul + (i + 1) % kv_mul,
                      g * kv_mul + (i + 2) % kv_mul, g * kv_mul + (i + 3) % kv_mul)
                rn = (positions[rt[0]] + 1, positions[rt[1]] + 1, positions[rt[2]] + 1,
                      positions[rt[3]] + 1)
                _attend_rows(out, qs, att, wts, k_cache, v_cache, table, layer, rt, rh, rn,
                             k0, head_dim, scale)
                i += ATT_ROWS
        while i < n_rows:
            t = ta + i // kv_mul
            q0 = (g * kv_mul + i % kv_mul) * head_dim
            _attend_row(out[t, q0:q0 + head_dim], qs[t, q0:q0 + head_dim], att[0], wts[0],
                        k_cache, v_cache, table, layer, positions[t] + 1, k0, scale)
            i += 1


@njit(**_opts)
def _swiglu_row(out, h13):
    """out (hidden,) = silu(h1) * h3 where h13 (2 hidden,) holds [h1 | h3]."""
    hidden = out.shape[0]
    for j in range(hidden):
        a = h13[j]
        out[j] = a * (np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-a)))) \
            * h13[hidden + j]


@njit(**_opts)
def _swiglu_load_row(hact, h13, xa, xs, xc):
    _swiglu_row(hact, h13)
    _load_row(hact, xa, xs, xc)


@njit(parallel=True, **_opts)
def _swiglu_load_par(hact, h13, xa, xs, xc):
    for t in prange(h13.shape[0]):
        _swiglu_load_row(hact[t], h13[t], xa[t], xs[t], xc[t])


@njit(**_opts)
def swiglu_load(hact, h13, xa, xs, xc):
    """hact = swiglu(h13) row by row, then loaded as the w2 matmul input."""
    if h13.shape[0] >= PARALLEL_ROWS:
        _swiglu_load_par(hact, h13, xa, xs, xc)
    else:
        for t in range(h13.shape[0]):
            _swiglu_load_row(hact[t], h13[t], xa[t], xs[t], xc[t])


@njit(parallel=True, **_opts)
def _add_into_par(x, y):
    for t in prange(x.shape[0]):
        x[t] += y[t]


@njit(**_opts)
def add_into(x, y):
    """x (T, n) += y (T, n)"""
    if x.shape[0] >= PARALLEL_ROWS:
        _add_into_par(x, y)
    else:
        for t in range(x.shape[0]):
            x[t] += y[t]

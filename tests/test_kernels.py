"""Kernels against plain numpy: matmul tiles, activation quantization, norms, RoPE."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from tiller.engine import kernels as K
from tiller.engine.config import GROUP_SIZE
from tiller.engine.quant import quantize_q8_0
from tiller.engine.simd import (
    HAS_BF16,
    HAS_VNNI,
    exp_sum,
    make_qtile,
    make_scores,
    make_weighted_sum,
    scale_max,
    to_bf16,
)
from tiller.engine.weights import deinterleave, interleave

RNG = np.random.default_rng(1234)
NO_QB = np.zeros((64, 0), np.uint16)  # the queries' bfloat16 copy: none with float32 keys


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16): round to nearest even, subnormals to +0 (numpy)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where((u & 0x7F800000) == 0, np.uint16(0), r)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint32) << 16).view(np.float32)


def q8_operands(d: int, n: int, T: int):
    """Random Q8_0 operands: int8 weights and their engine layout (uint8+128, interleaved)."""
    w = RNG.integers(-127, 128, (d, n), dtype=np.int8)
    ws = RNG.random((d, n // GROUP_SIZE), dtype=np.float32)
    x = RNG.integers(-127, 128, (T, n), dtype=np.int8)
    xs = RNG.random((T, n // GROUP_SIZE), dtype=np.float32)
    w3, ws3 = interleave((w.astype(np.int16) + 128).astype(np.uint8), ws)
    return w, ws, x, xs, w3, ws3


def corrections(x):
    """-128 * sum of each group of activations: cancels the weights' +128 exactly."""
    return (-128 * x.astype(np.int32).reshape(x.shape[0], -1, GROUP_SIZE).sum(-1)).astype(np.int32)


def q8_matmul_numpy(w, ws, x, xs):
    """Exact group dot products (int64) scaled and summed in float64."""
    d, n = w.shape
    T = x.shape[0]
    g = n // GROUP_SIZE
    dots = np.einsum("dgk,tgk->tdg", w.reshape(d, g, GROUP_SIZE).astype(np.int64),
                     x.reshape(T, g, GROUP_SIZE).astype(np.int64))
    return (dots * ws[None].astype(np.float64) * xs[:, None].astype(np.float64)).sum(-1)


def test_interleaved_layout_puts_16_rows_of_a_quad_in_64_bytes():
    w = RNG.integers(0, 256, (21, 64), dtype=np.uint8)
    ws = RNG.random((21, 2), dtype=np.float32)
    w3, ws3 = interleave(w, ws)
    assert w3.shape == (2, 16, 64) and ws3.shape == (2, 2, 16)
    for r, k in [(0, 0), (5, 7), (17, 63), (20, 33)]:
        assert w3[r // 16, k // 4, 4 * (r % 16) + k % 4] == w[r, k]
        assert ws3[r // 16, k // 32, r % 16] == ws[r, k // 32]
    assert (w3[1, :, 4 * 5:] == 128).all() and not ws3[1, :, 5:].any()  # pad rows: zero weights
    back, back_s = deinterleave(w3, ws3, 21)
    assert np.array_equal(back, w) and np.array_equal(back_s, ws)


@pytest.mark.parametrize("d,n,T", [(4, 64, 1), (13, 192, 7), (64, 128, 16), (6, 64, 5),
                                   (100, 256, 4), (80, 64, 3)])
def test_q8_linear_matches_exact_integer_matmul(d, n, T):
    w, ws, x, xs, w3, ws3 = q8_operands(d, n, T)
    out = np.full((T, d + 3), 7.0, np.float32)  # columns >= d must stay untouched
    K.linear(out[:, :d], x, xs, corrections(x), w3, ws3)
    ref = q8_matmul_numpy(w, ws, x, xs)
    np.testing.assert_allclose(out[:, :d], ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    assert (out[:, d:] == 7.0).all()


@pytest.mark.parametrize("d,n,T", [(5, 16, 3), (32, 96, 9)])
def test_f32_linear_matches_numpy(d, n, T):
    w = RNG.standard_normal((d, n), dtype=np.float32)
    x = RNG.standard_normal((T, n), dtype=np.float32)
    out = np.zeros((T, d), np.float32)
    K.linear(out, x, np.zeros((T, 0), np.float32), np.zeros((T, 0), np.int32), w,
             np.zeros((d, 0), np.float32))
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5)


def test_linear_rows_are_batch_invariant_bitwise():
    # each output row must not depend on which tile (4x3, 4x1, 1x3, 1x1 blocks) computed it
    w, ws, x, xs, w3, ws3 = q8_operands(90, 256, 11)
    batch = np.zeros((11, 90), np.float32)
    K.linear(batch, x, xs, corrections(x), w3, ws3)
    for t in range(11):
        alone = np.zeros((1, 90), np.float32)
        K.linear(alone, x[t:t + 1].copy(), xs[t:t + 1].copy(), corrections(x[t:t + 1]), w3, ws3)
        assert np.array_equal(alone[0], batch[t])


_generic_tile = make_qtile(1, 1, vnni=False)


@njit
def _linear_generic(out, x, xs, xc, w, ws):
    for rb in range(w.shape[0]):
        for b in range(x.shape[0]):
            _generic_tile(out, x, xs, xc, w, ws, rb, b)


def test_portable_path_gives_the_same_bits_as_vnni():
    w, ws, x, xs, w3, ws3 = q8_operands(75, 320, 6)
    fast = np.zeros((6, 75), np.float32)
    K.linear(fast, x, xs, corrections(x), w3, ws3)
    portable = np.zeros((6, 75), np.float32)
    _linear_generic(portable, x, xs, corrections(x), w3, ws3)
    assert np.array_equal(fast, portable), f"VNNI in use: {HAS_VNNI}"


@pytest.mark.parametrize("n", [64, 172, 288])
def test_activation_quantizer_follows_engine_quant_exactly(n):
    x = RNG.standard_normal((5, n), dtype=np.float32) * 3
    x[1, :GROUP_SIZE] = 0  # an all-zero group
    x[2, :4] = [0.5, -1.5, 2.5, 127 / 254]  # half-way cases for round-half-to-even
    x[2, 4:GROUP_SIZE] = 0
    x[2, 4] = 1.0  # amax 2.5 -> inv 50.8: 0.5*50.8 = 25.4 etc.; plus exact halves below
    x[3, :GROUP_SIZE] = np.float32(127.0)  # scale exactly 1: every value rounds to 127
    x[3, 1] = 0.5  # 0.5 * 1 = 0.5 -> 0 (half to even)
    x[3, 2] = 1.5  # -> 2
    n_pad = -(-n // 64) * 64
    xa = np.full((5, n_pad), 99, np.int8)
    xs = np.full((5, n_pad // GROUP_SIZE), 99, np.float32)
    xc = np.full((5, n_pad // GROUP_SIZE), 99, np.int32)
    K.load_activations(x, xa, xs, xc)
    ref = quantize_q8_0(x)
    assert np.array_equal(xc, corrections(xa))
    assert np.array_equal(xa[:, :n], ref.values)
    assert np.array_equal(xs[:, :ref.scales.shape[1]], ref.scales)
    assert not xa[:, n:].any() and not xs[:, ref.scales.shape[1]:].any()
    assert xa[3, 1] == 0 and xa[3, 2] == 2


def test_norm_load_matches_numpy():
    x = RNG.standard_normal((3, 50), dtype=np.float32)
    w = RNG.standard_normal(50, dtype=np.float32)
    xb = np.zeros_like(x)
    xa = np.full((3, 64), 7.0, np.float32)  # f32 input buffer: the normed row, zero-padded
    empty_s, empty_c = np.zeros((3, 0), np.float32), np.zeros((3, 0), np.int32)
    K.norm_load(xb, x, w, np.float32(1e-5), xa, empty_s, empty_c)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(xb, ref, rtol=1e-5, atol=1e-6)
    assert np.array_equal(xa[:, :50], xb) and not xa[:, 50:].any()


def test_rope_rotates_pairs_and_stores_kv_in_the_right_block():
    n_heads, n_kv, hd = 2, 1, 8
    dim, kv_dim = n_heads * hd, n_kv * hd
    qkv = RNG.standard_normal((3, dim + 2 * kv_dim), dtype=np.float32)
    before = qkv.copy()
    positions = np.array([0, 1, 17], np.int32)  # 17: second block of its sequence
    seq_index = np.array([0, 0, 1], np.int32)
    block_tables = np.array([[3, 0], [1, 2]], np.int32)
    k_cache = np.zeros((2, 4, kv_dim, K.KV_BLOCK), np.float32)  # keys transposed per block
    v_cache = np.zeros((2, 4, K.KV_BLOCK, kv_dim), np.float32)
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(32)[:, None] * freqs[None]
    K.rope_store_kv(qkv, NO_QB[:3], positions, np.cos(ang).astype(np.float32),
                    np.sin(ang).astype(np.float32), n_heads, n_kv, hd, k_cache, v_cache, 1,
                    seq_index, block_tables)
    assert np.array_equal(qkv[0], before[0])  # position 0 is the identity
    rotated = (n_heads + n_kv) * hd
    assert np.array_equal(qkv[:, rotated:], before[:, rotated:])  # v is never rotated
    for t, p in enumerate(positions):
        for h in range(n_heads + n_kv):
            v = before[t, h * hd:(h + 1) * hd].astype(np.float64)
            a, b = v[0::2], v[1::2]
            c, s = np.cos(p * freqs), np.sin(p * freqs)
            ref = np.empty(hd)
            ref[0::2], ref[1::2] = a * c - b * s, a * s + b * c
            np.testing.assert_allclose(qkv[t, h * hd:(h + 1) * hd], ref, rtol=1e-5, atol=1e-6)
    # token t's k and v land in layer 1, block block_tables[seq, p // 16], row p % 16
    for t, (p, s) in enumerate(zip(positions, seq_index, strict=True)):
        blk = block_tables[s, p // K.KV_BLOCK]
        assert np.array_equal(k_cache[1, blk, :, p % K.KV_BLOCK], qkv[t, dim:dim + kv_dim])
        assert np.array_equal(v_cache[1, blk, p % K.KV_BLOCK], qkv[t, dim + kv_dim:])
    assert not k_cache[0].any()


@njit
def _exp_sum(a, n, top):
    return exp_sum(a, n, top)


def test_exp_sum_matches_numpy_exp_and_zeroes_the_tail():
    a = np.concatenate([-np.linspace(0, 100, 40), np.full(8, 5.0)]).astype(np.float32)
    want = np.exp(a[:37].astype(np.float64) - 1.5)
    total = _exp_sum(a, 37, np.float32(1.5))
    np.testing.assert_allclose(a[:37], want, rtol=3e-7, atol=1e-37)
    assert not a[37:].any()  # past n: zero, left out of the sum
    np.testing.assert_allclose(total, want.sum(), rtol=1e-6)


@njit
def _scale_max(a, n, scale):
    return scale_max(a, n, scale)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_scale_max_scales_and_finds_the_largest_of_the_first_n(n):
    a = RNG.standard_normal(48).astype(np.float32)
    a[n:] = 1e30  # past n: scaled, but never the max
    if n > 3:
        a[2] = np.nan  # NaN is passed over, as `v > top` does
    want = a * np.float32(0.125)
    top = _scale_max(a, n, np.float32(0.125))
    assert np.array_equal(a[:n], want[:n], equal_nan=True)
    assert top == np.nanmax(want[:n])


@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 4, 2), (8, 2, 2)])
def test_attention_matches_numpy_over_paged_transposed_keys(head_dim, n_heads, n_kv):
    dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    positions = np.array([0, 15, 16, 40, 3], np.int32)  # block edges and a second sequence
    seq_index = np.array([0, 0, 0, 0, 1], np.int32)
    block_tables = np.array([[5, 2, 7], [1, 0, 0]], np.int32)
    keys = RNG.standard_normal((2, 48, kv_dim), dtype=np.float32)  # per sequence, by position
    values = RNG.standard_normal((2, 48, kv_dim), dtype=np.float32)
    k_cache = np.full((1, 8, kv_dim, K.KV_BLOCK), np.nan, np.float32)  # stale rows: NaN
    v_cache = np.full((1, 8, K.KV_BLOCK, kv_dim), np.nan, np.float32)
    for s in range(2):
        for p in range(48 if s == 0 else 16):
            blk = block_tables[s, p // K.KV_BLOCK]
            k_cache[0, blk, :, p % K.KV_BLOCK] = keys[s, p]
            v_cache[0, blk, p % K.KV_BLOCK] = values[s, p]
    for s in range(2):  # positions past each query's own are stale for it: make them huge
        k_cache[0, block_tables[s, 2 if s == 0 else 0], :, 9:] = 1e30 if s == 0 else np.nan
    qkv = RNG.standard_normal((5, dim + 2 * kv_dim), dtype=np.float32)
    out = np.zeros((5, dim), np.float32)
    scratch = np.zeros((2, K.ATT_ROWS, 64), np.float32)
    K.attention(out, qkv, NO_QB, k_cache, v_cache, 0, positions, seq_index, block_tables,
                n_heads, n_kv, head_dim, scratch, scratch)
    for t, (p, s) in enumerate(zip(positions, seq_index, strict=True)):
        for h in range(n_heads):
            kh = (h // (n_heads // n_kv)) * head_dim
            q = qkv[t, h * head_dim:(h + 1) * head_dim].astype(np.float64)
            sc = keys[s, :p + 1, kh:kh + head_dim] @ q / np.sqrt(head_dim)
            w = np.exp(sc - sc.max())
            ref = (w / w.sum()) @ values[s, :p + 1, kh:kh + head_dim]
            np.testing.assert_allclose(out[t, h * head_dim:(h + 1) * head_dim], ref, rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("cache", ["f32", "bf16"])
@pytest.mark.parametrize("head_dim, n_heads, n_kv", [(64, 2, 2), (128, 2, 1), (32, 8, 2),
                                                     (48, 2, 2)])
def test_attention_of_a_chunk_is_bitwise_each_token_alone(head_dim, n_heads, n_kv, cache):
    # a chunk's tokens (and the heads sharing a KV head) are computed several rows at a time,
    # sharing key and value loads: each row must still be the bits it gets when computed alone
    T, kv_dim = 37, n_kv * head_dim
    dim = n_heads * head_dim
    block_tables = np.array([[3, 0, 5, 1, 4, 2]], np.int32)
    qkv = RNG.standard_normal((T, dim + 2 * kv_dim), dtype=np.float32)
    scratch = np.zeros((2, K.ATT_ROWS, 96), np.float32)
    if cache == "f32":
        k_cache = RNG.standard_normal((1, 6, kv_dim, K.KV_BLOCK), dtype=np.float32)
        v_cache = RNG.standard_normal((1, 6, K.KV_BLOCK, kv_dim), dtype=np.float32)
        qb, weights = NO_QB[:T], scratch
    else:
        k_cache = bf16(RNG.standard_normal((1, 6, kv_dim // 2, K.KV_BLOCK, 2)).astype("f4"))
        v_cache = bf16(RNG.standard_normal((1, 6, K.KV_BLOCK // 2, kv_dim, 2)).astype("f4"))
        qb, weights = bf16(qkv[:, :dim]), np.zeros(scratch.shape, np.uint16)
    positions = np.arange(50, 50 + T, dtype=np.int32)
    seq_index = np.zeros(T, np.int32)
    chunk = np.zeros((T, dim), np.float32)
    K.attention(chunk, qkv, qb, k_cache, v_cache, 0, positions, seq_index, block_tables,
                n_heads, n_kv, head_dim, scratch, weights)
    for t in range(T):
        alone = np.zeros((1, dim), np.float32)
        K.attention(alone, qkv[t:t + 1], qb[t:t + 1], k_cache, v_cache, 0, positions[t:t + 1],
                    seq_index[:1], block_tables, n_heads, n_kv, head_dim, scratch, weights)
        assert np.array_equal(alone[0], chunk[t]), t


def test_bf16_rounds_to_nearest_even_and_flushes_subnormals():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 1e-39, -1e-39,
                  3.4e38, np.inf], np.float32)
    # ties go to the even mantissa: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6; just above a tie
    # rounds up; subnormals become +0; the largest floats round to inf
    want = [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, 0.0, 0.0, np.inf, np.inf]
    assert from_bf16(bf16(x)).tolist() == want
    got = np.array([_to_bf16(v) for v in x], np.uint16)
    assert np.array_equal(got, bf16(x))
    assert _to_bf16(np.float32(np.nan)) == 0x7FC0


@njit
def _to_bf16(x):
    return to_bf16(x)


def _bf16_caches(keys: np.ndarray, values: np.ndarray, block_tables: np.ndarray, lengths,
                 n_blocks: int, stale: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
    """keys/values (S, P, kv_dim) per sequence and position into bfloat16 caches in the
    engine's layouts (engine/kvcache.py); every other entry holds `stale`."""
    kv_dim = keys.shape[2]
    k_cache = np.full((1, n_blocks, kv_dim // 2, K.KV_BLOCK, 2), bf16(np.float32(stale)))
    v_cache = np.full((1, n_blocks, K.KV_BLOCK // 2, kv_dim, 2), bf16(np.float32(stale)))
    for s, n in enumerate(lengths):
        for p in range(n):
            blk, i = block_tables[s, p // K.KV_BLOCK], p % K.KV_BLOCK
            k_cache[0, blk, :, i, :] = bf16(keys[s, p]).reshape(kv_dim // 2, 2)
            v_cache[0, blk, i // 2, :, i % 2] = bf16(values[s, p])
    return k_cache, v_cache


def test_rope_store_kv_writes_bf16_keys_values_and_queries_in_their_layouts():
    n_heads, n_kv, hd = 2, 1, 32
    dim, kv_dim = n_heads * hd, n_kv * hd
    qkv = RNG.standard_normal((3, dim + 2 * kv_dim), dtype=np.float32)
    positions = np.array([0, 1, 17], np.int32)
    seq_index = np.array([0, 0, 1], np.int32)
    block_tables = np.array([[3, 0], [1, 2]], np.int32)
    k_cache = np.zeros((2, 4, kv_dim // 2, K.KV_BLOCK, 2), np.uint16)
    v_cache = np.zeros((2, 4, K.KV_BLOCK // 2, kv_dim, 2), np.uint16)
    qb = np.zeros((3, dim), np.uint16)
    ang = np.arange(32)[:, None] * (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))[None]
    K.rope_store_kv(qkv, qb, positions, np.cos(ang).astype(np.float32),
                    np.sin(ang).astype(np.float32), n_heads, n_kv, hd, k_cache, v_cache, 1,
                    seq_index, block_tables)
    assert np.array_equal(qb, bf16(qkv[:, :dim]))  # the rotated queries, rounded
    for t, (p, s) in enumerate(zip(positions, seq_index, strict=True)):
        blk, i = block_tables[s, p // K.KV_BLOCK], p % K.KV_BLOCK
        k, v = qkv[t, dim:dim + kv_dim], qkv[t, dim + kv_dim:]
        assert np.array_equal(k_cache[1, blk, :, i, :].reshape(-1), bf16(k))  # dims in pairs
        assert np.array_equal(v_cache[1, blk, i // 2, :, i % 2], bf16(v))  # positions in pairs
    assert not k_cache[0].any() and not v_cache[0].any()


@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 4, 2), (48, 2, 2), (32, 4, 1)])
def test_bf16_attention_matches_numpy_with_the_same_roundings(head_dim, n_heads, n_kv):
    # queries, keys, values and the softmax weights rounded to bfloat16, all else float64:
    # the kernel's float32 sums agree to float32 precision. Every entry it must not read
    # (stale positions, past a query's own) is NaN: an odd length ends inside a pair of
    # positions whose other value is NaN, and must still add nothing
    dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    positions = np.array([0, 15, 16, 40, 3, 2], np.int32)
    seq_index = np.array([0, 0, 0, 0, 1, 1], np.int32)
    block_tables = np.array([[5, 2, 7], [1, 0, 0]], np.int32)
    keys = RNG.standard_normal((2, 48, kv_dim), dtype=np.float32)
    values = RNG.standard_normal((2, 48, kv_dim), dtype=np.float32)
    k_cache, v_cache = _bf16_caches(keys, values, block_tables, (41, 4), 8)
    qkv = RNG.standard_normal((6, dim + 2 * kv_dim), dtype=np.float32)
    qb = bf16(qkv[:, :dim])
    out = np.zeros((6, dim), np.float32)
    scratch = np.zeros((2, K.ATT_ROWS, 64), np.float32)
    K.attention(out, qkv, qb, k_cache, v_cache, 0, positions, seq_index, block_tables,
                n_heads, n_kv, head_dim, scratch, np.zeros(scratch.shape, np.uint16))
    for t, (p, s) in enumerate(zip(positions, seq_index, strict=True)):
        for h in range(n_heads):
            kh = (h // (n_heads // n_kv)) * head_dim
            q = from_bf16(qb[t, h * head_dim:(h + 1) * head_dim]).astype(np.float64)
            k = from_bf16(bf16(keys[s, :p + 1, kh:kh + head_dim])).astype(np.float64)
            v = from_bf16(bf16(values[s, :p + 1, kh:kh + head_dim])).astype(np.float64)
            sc = k @ q / np.sqrt(head_dim)
            e = np.exp(sc - sc.max())
            w = from_bf16(bf16((e / e.sum()).astype(np.float32))).astype(np.float64)
            np.testing.assert_allclose(out[t, h * head_dim:(h + 1) * head_dim], w @ v,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks,rows", [(1, 1), (4, 4)])
def test_bf16_scores_are_the_same_bits_on_the_native_and_portable_paths(blocks, rows):
    if not HAS_BF16:
        pytest.skip("no AVX512-BF16 here: only the portable path runs")
    native, portable = make_scores(blocks, True), make_scores(blocks, False)

    @njit
    def run_native(atts, qs, k_cache, table):
        native(atts, qs, k_cache, 0, table, 0, 32)

    @njit
    def run_portable(atts, qs, k_cache, table):
        portable(atts, qs, k_cache, 0, table, 0, 32)

    k_cache = bf16(RNG.standard_normal((1, 6, 64, K.KV_BLOCK, 2)).astype(np.float32) * 3)
    table = np.array([4, 1, 0, 5], np.int32)
    qs = tuple(bf16(RNG.standard_normal(64).astype(np.float32)) for _ in range(rows))
    a = tuple(np.zeros(64, np.float32) for _ in range(rows))
    b = tuple(np.zeros(64, np.float32) for _ in range(rows))
    run_native(a, qs, k_cache, table)
    run_portable(b, qs, k_cache, table)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x[:16 * blocks].view(np.uint32), y[:16 * blocks].view(np.uint32))


@pytest.mark.parametrize("p0,p1", [(0, 37), (4, 5), (0, 64), (16, 33)])
def test_bf16_weighted_sums_are_the_same_bits_on_the_native_and_portable_paths(p0, p1):
    if not HAS_BF16:
        pytest.skip("no AVX512-BF16 here: only the portable path runs")
    native, portable = make_weighted_sum(2, True), make_weighted_sum(2, False)

    @njit
    def run_native(os, ws, v_cache, table, p0, p1):
        native(os, ws, v_cache, 0, table, p0, p1, 32)

    @njit
    def run_portable(os, ws, v_cache, table, p0, p1):
        portable(os, ws, v_cache, 0, table, p0, p1, 32)

    v_cache = bf16(RNG.standard_normal((1, 6, K.KV_BLOCK // 2, 64, 2)).astype(np.float32))
    table = np.array([4, 1, 0, 5], np.int32)
    w = RNG.random(64).astype(np.float32)
    w[p1:] = 0  # past the row's end the weights are 0 (simd.bf16_weights after exp_sum)
    ws = (bf16(w / w.sum()),)
    start = RNG.standard_normal(32).astype(np.float32)
    a, b = (start.copy(),), (start.copy(),)
    run_native(a, ws, v_cache, table, p0, p1)
    run_portable(b, ws, v_cache, table, p0, p1)
    assert np.array_equal(a[0].view(np.uint32), b[0].view(np.uint32))
    assert not np.array_equal(a[0], start)


def test_tiller_simd_chooses_the_path_and_refuses_unknown_names(monkeypatch):
    from tiller.engine import simd

    monkeypatch.setenv("TILLER_SIMD", "generic")
    assert simd._target_has_vnni() is False
    monkeypatch.setenv("TILLER_SIMD", "avx9000")
    with pytest.raises(ValueError, match="TILLER_SIMD must be one of"):
        simd._target_has_vnni()
    monkeypatch.setenv("TILLER_SIMD", "vnni")
    import llvmlite.binding as llvm

    if "+avx512vnni" in llvm.get_host_cpu_features().flatten().split(","):
        assert simd._target_has_vnni() is True
    else:
        with pytest.raises(ValueError, match="no AVX512-VNNI"):
            simd._target_has_vnni()

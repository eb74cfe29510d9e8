"""GGUF tensor encodings decoded at load: F32, F16, BF16 and the quantizations llama.cpp writes
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), straight into the engine's arrays.

Block layouts are ggml's (ggml/src/ggml-common.h); the arithmetic is gguf-py's numpy reference
(gguf/quants.py `dequantize_blocks`) operation for operation, so results are bitwise equal to
`gguf.quants.dequantize` in float32 (tests/test_dequant.py). Each decoder is a small function
over one row; two parallel drivers run them over the rows of a matrix, one writing float32,
the other requantizing each decoded row to the engine's Q8_0 (engine/kernels.py's quantizer, so
the rounding is the activations'). A Q8_0 source keeps its int8 values and scales.

NOTE: numba does no bounds checks. The drivers read exactly `row_bytes(type, n)` bytes per row;
`Packed` checks that its views have that shape, and engine/gguf.py has checked every tensor
against the file (type, row length a multiple of the block, bytes inside the file) before a
Packed is made.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .config import GROUP_SIZE
from .kernels import _quantize_row  # the activations' quantizer: one rounding convention
from .quant import QTensor

QK_K = 256  # values per K-quant super-block
# type -> (values per block, bytes per block), as gguf-py's GGML_QUANT_SIZES
BLOCKS: dict[T, tuple[int, int]] = {
    T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2),
    T.Q4_0: (32, 2 + 16), T.Q4_1: (32, 2 + 2 + 16), T.Q5_0: (32, 2 + 4 + 16),
    T.Q5_1: (32, 2 + 2 + 4 + 16), T.Q8_0: (32, 2 + 32),
    T.Q2_K: (QK_K, 16 + 64 + 2 + 2), T.Q3_K: (QK_K, 32 + 64 + 12 + 2),
    T.Q4_K: (QK_K, 2 + 2 + 12 + 128), T.Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),
    T.Q6_K: (QK_K, 128 + 64 + 16 + 2),
}
TYPES = tuple(BLOCKS)
# the kernels switch on these small ints (numba cannot specialize on an enum value)
_KIND = {t: i for i, t in enumerate(TYPES)}
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(len(TYPES))

# 16-bit float -> float32 by table: exact (numpy's own conversion), and one load per value
_HALF = np.stack([np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32),
                  (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)])
_F16_ROW, _BF16_ROW = 0, 1

_opts: dict[str, Any] = {"nogil": True, "cache": True}


def row_bytes(ggml_type: T, n: int) -> int:
    """Bytes of a row of n values (n a multiple of the type's block)."""
    block, nbytes = BLOCKS[ggml_type]
    return n // block * nbytes


def row_problem(ggml_type: T, n: int) -> str | None:
    """Why rows of n values cannot be stored as `ggml_type` (any type ggml knows), or None."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    if n % block:
        kind = "super-block (QK_K)" if block == QK_K else "block"
        return (f"rows of {n} values, not a multiple of the {ggml_type.name} {kind} of "
                f"{block}")
    return None


# -----------------------------------------------------------------------------------------------
# block decoders: out (block values,) f32 <- b (block bytes,) uint8; h = the f16 table


@njit(**_opts)
def _f16(b, i, h):
    """The little-endian float16 at b[i:i+2], as float32."""
    return h[np.int32(b[i]) | (np.int32(b[i + 1]) << 8)]


@njit(**_opts)
def _q4_0(b, out, h):
    # d (f16) | 16 bytes: value j in the low nibble of byte j, value j+16 in its high nibble
    d = _f16(b, 0, h)
    for j in range(16):
        x = np.int32(b[2 + j])
        out[j] = d * np.float32((x & 0xF) - 8)
        out[j + 16] = d * np.float32((x >> 4) - 8)


@njit(**_opts)
def _q4_1(b, out, h):
    # d, m (f16) | nibbles as Q4_0, unsigned; value = d * q + m
    d, m = _f16(b, 0, h), _f16(b, 2, h)
    for j in range(16):
        x = np.int32(b[4 + j])
        out[j] = d * np.float32(x & 0xF) + m
        out[j + 16] = d * np.float32(x >> 4) + m


@njit(**_opts)
def _high_bits(b, i):
    """The little-endian uint32 at b[i:i+4]: bit j is the fifth bit of value j."""
    return (np.uint32(b[i]) | (np.uint32(b[i + 1]) << 8) | (np.uint32(b[i + 2]) << 16)
            | (np.uint32(b[i + 3]) << 24))


@njit(**_opts)
def _q5_0(b, out, h):
    # d (f16) | qh (uint32, the fifth bits) | nibbles as Q4_0; value = d * (q - 16)
    d = _f16(b, 0, h)
    qh = _high_bits(b, 2)
    for j in range(16):
        x = np.int32(b[6 + j])
        lo = (x & 0xF) | (np.int32((qh >> j) & 1) << 4)
        hi = (x >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo - 16)
        out[j + 16] = d * np.float32(hi - 16)


@njit(**_opts)
def _q5_1(b, out, h):
    # d, m (f16) | qh | nibbles; value = d * q + m
    d, m = _f16(b, 0, h), _f16(b, 2, h)
    qh = _high_bits(b, 4)
    for j in range(16):
        x = np.int32(b[8 + j])
        lo = (x & 0xF) | (np.int32((qh >> j) & 1) << 4)
        hi = (x >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo) + m
        out[j + 16] = d * np.float32(hi) + m


@njit(**_opts)
def _q8_0(b, out, h):
    # d (f16) | 32 int8
    d = _f16(b, 0, h)
    for j in range(32):
        out[j] = np.float32(np.int8(b[2 + j])) * d


@njit(**_opts)
def _q2_k(b, out, h):
    # scales[16] (low nibble scale, high nibble min, per 16 values) | qs[64] | d | dmin (f16).
    # Value 128*c + 32*s + j (c < 2, s < 4, j < 32) is bits 2s..2s+1 of qs[32c + j].
    d, dmin = _f16(b, 80, h), _f16(b, 82, h)
    for c in range(2):
        for s in range(4):
            for half in range(2):
                sb = 8 * c + 2 * s + half  # sub-block of 16 values
                dl = d * np.float32(np.int32(b[sb]) & 0xF)
                ml = dmin * np.float32(np.int32(b[sb]) >> 4)
                for j in range(16 * half, 16 * half + 16):
                    q = (np.int32(b[16 + 32 * c + j]) >> (2 * s)) & 3
                    out[128 * c + 32 * s + j] = dl * np.float32(q) - ml


@njit(**_opts)
def _q3_k(b, out, h):
    # hmask[32] | qs[64] | scales[12] (16 six-bit scales, offset 32) | d (f16).
    # Value i = 128*c + 32*s + j: low bits 2s..2s+1 of qs[32c + j]; its hmask bit, bit i // 32
    # of hmask[j], *set* means no offset and clear means -4.
    d = _f16(b, 108, h)
    dl = np.empty(16, np.float32)
    for i in range(16):
        low = (np.int32(b[96 + i]) & 0xF) if i < 8 else (np.int32(b[96 + i - 8]) >> 4)
        high = (np.int32(b[104 + i % 4]) >> (2 * (i // 4))) & 3
        dl[i] = d * np.float32((low | (high << 4)) - 32)
    for c in range(2):
        for s in range(4):
            for j in range(32):
                i = 128 * c + 32 * s + j
                q = (np.int32(b[32 + 32 * c + j]) >> (2 * s)) & 3
                if not (np.int32(b[j]) >> (i // 32)) & 1:
                    q -= 4
                out[i] = dl[i // 16] * np.float32(q)


@njit(**_opts)
def _scale_min_k4(b, j):
    """The six-bit scale and min of sub-block j (< 8) packed in b[4:16] (Q4_K, Q5_K)."""
    if j < 4:
        return np.int32(b[4 + j]) & 0x3F, np.int32(b[8 + j]) & 0x3F
    k = j - 4
    sc = (np.int32(b[12 + k]) & 0xF) | ((np.int32(b[4 + k]) >> 2) & 0x30)
    m = (np.int32(b[12 + k]) >> 4) | ((np.int32(b[8 + k]) >> 2) & 0x30)
    return sc, m


@njit(**_opts)
def _q4_k(b, out, h):
    # d, dmin (f16) | scales[12] | qs[128]. Value 64*c + 32*s + j is nibble s of qs[32c + j],
    # in sub-block 2c + s: d * sc * q - dmin * m.
    d, dmin = _f16(b, 0, h), _f16(b, 2, h)
    for c in range(4):
        for s in range(2):
            sc, m = _scale_min_k4(b, 2 * c + s)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            for j in range(32):
                q = (np.int32(b[16 + 32 * c + j]) >> (4 * s)) & 0xF
                out[64 * c + 32 * s + j] = dl * np.float32(q) - ml


@njit(**_opts)
def _q5_k(b, out, h):
    # d, dmin | scales[12] | qh[32] | qs[128]: Q4_K's nibbles with a fifth bit, bit i // 32 of
    # qh[j] for value i = 32 * sub-block + j.
    d, dmin = _f16(b, 0, h), _f16(b, 2, h)
    for c in range(4):
        for s in range(2):
            sb = 2 * c + s
            sc, m = _scale_min_k4(b, sb)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            for j in range(32):
                q = ((np.int32(b[48 + 32 * c + j]) >> (4 * s)) & 0xF) \
                    | (((np.int32(b[16 + j]) >> sb) & 1) << 4)
                out[32 * sb + j] = dl * np.float32(q) - ml


@njit(**_opts)
def _q6_k(b, out, h):
    # ql[128] | qh[64] | scales[16] (int8, per 16 values) | d (f16). Value 128*c + r (r < 128):
    # low nibble r // 64 of ql[64c + r % 64], high bits 2(r // 32).. of qh[32c + r % 32]; q - 32.
    d = _f16(b, 208, h)
    for c in range(2):
        for r in range(128):
            lo = (np.int32(b[64 * c + r % 64]) >> (4 * (r // 64))) & 0xF
            hi = (np.int32(b[128 + 32 * c + r % 32]) >> (2 * (r // 32))) & 3
            i = 128 * c + r
            dl = d * np.float32(np.int8(b[192 + i // 16]))
            out[i] = dl * np.float32((lo | (hi << 4)) - 32)


@njit(**_opts)
def _decode_row(kind, src, out, half):
    """out (n,) f32 <- src (row_bytes,) uint8, a row of `kind` (one of F32 .. Q6_K)."""
    n = out.shape[0]
    if kind == F32:
        out[:] = src.view(np.float32)
        return
    if kind in (F16, BF16):
        table = half[_F16_ROW] if kind == F16 else half[_BF16_ROW]
        bits = src.view(np.uint16)
        for j in range(n):
            out[j] = table[bits[j]]
        return
    h = half[_F16_ROW]
    if kind == Q4_0:
        for k in range(n // 32):
            _q4_0(src[18 * k:18 * k + 18], out[32 * k:32 * k + 32], h)
    elif kind == Q4_1:
        for k in range(n // 32):
            _q4_1(src[20 * k:20 * k + 20], out[32 * k:32 * k + 32], h)
    elif kind == Q5_0:
        for k in range(n // 32):
            _q5_0(src[22 * k:22 * k + 22], out[32 * k:32 * k + 32], h)
    elif kind == Q5_1:
        for k in range(n // 32):
            _q5_1(src[24 * k:24 * k + 24], out[32 * k:32 * k + 32], h)
    elif kind == Q8_0:
        for k in range(n // 32):
            _q8_0(src[34 * k:34 * k + 34], out[32 * k:32 * k + 32], h)
    elif kind == Q2_K:
        for k in range(n // QK_K):
            _q2_k(src[84 * k:84 * k + 84], out[QK_K * k:QK_K * k + QK_K], h)
    elif kind == Q3_K:
        for k in range(n // QK_K):
            _q3_k(src[110 * k:110 * k + 110], out[QK_K * k:QK_K * k + QK_K], h)
    elif kind == Q4_K:
        for k in range(n // QK_K):
            _q4_k(src[144 * k:144 * k + 144], out[QK_K * k:QK_K * k + QK_K], h)
    elif kind == Q5_K:
        for k in range(n // QK_K):
            _q5_k(src[176 * k:176 * k + 176], out[QK_K * k:QK_K * k + QK_K], h)
    else:
        for k in range(n // QK_K):
            _q6_k(src[210 * k:210 * k + 210], out[QK_K * k:QK_K * k + QK_K], h)


@njit(**_opts)
def _all_finite(x):
    for j in range(x.shape[0]):  # noqa: SIM110 (numba: a plain loop, no temporary array)
        if not np.isfinite(x[j]):
            return False
    return True


# -----------------------------------------------------------------------------------------------
# drivers: one row per iteration, disjoint outputs


@njit(parallel=True, **_opts)
def _rows_to_f32(kind, src, n, out, bad, half):
    """out[:, :n] (rows, >= n) f32 <- src (rows, row_bytes) uint8; bad[r] if row r is not finite."""
    for r in prange(src.shape[0]):
        row = out[r, :n]
        _decode_row(kind, src[r], row, half)
        bad[r] = not _all_finite(row)


@njit(parallel=True, **_opts)
def _rows_to_q8_0(kind, src, n, values, scales, bad, half):
    """values (rows, n_pad) uint8 q+128 and scales (rows, n_pad/32) f32 <- src (rows, row_bytes),
    pad groups q = 0 with scale 0; bad[r] if row r has a non-finite value or scale."""
    n_pad = values.shape[1]
    for r in prange(src.shape[0]):
        if kind == Q8_0:
            # NOTE: GGUF's Q8_0 blocks of 32 are the engine's groups: kept, not requantized
            for g in range(n // 32):
                s = _f16(src[r], 34 * g, half[_F16_ROW])
                scales[r, g] = s
                bad[r] = bad[r] or not np.isfinite(s)
                for j in range(32):
                    values[r, 32 * g + j] = np.uint8(np.int32(np.int8(src[r, 34 * g + 2 + j]))
                                                     + 128)
            values[r, n:] = 128
            scales[r, n // 32:] = 0
        else:
            x = np.empty(n, np.float32)
            _decode_row(kind, src[r], x, half)
            bad[r] = not _all_finite(x)
            v = values[r]
            _quantize_row(x, v.view(np.int8), scales[r])
            for j in range(n_pad):  # q + 128 (mod 256) flips the top bit
                v[j] ^= 0x80


# -----------------------------------------------------------------------------------------------
# a matrix still in its file's encoding


@dataclass(frozen=True, eq=False)
class Packed:
    """A matrix (rows, n), or a stack of them over layers (layers, rows, n), still encoded as in
    its file: `parts` are uint8 (rows, row_bytes) views of the memory-mapped file, one per layer
    (each layer may have its own type). Decoded only into arrays the caller owns, a layer at a
    time, so loading never holds the model in float32."""

    names: tuple[str, ...]  # the file's tensor names, one per part (for messages)
    types: tuple[T, ...]
    parts: tuple[np.ndarray, ...]
    n: int  # values per row
    stacked: bool  # (layers, rows, n) rather than (rows, n)
    fail: Callable[[str], Exception]  # an error naming the file

    def __post_init__(self) -> None:
        if not self.parts or len({len(self.names), len(self.types), len(self.parts)}) != 1:
            raise ValueError("Packed needs one name and type per part")
        if not self.stacked and len(self.parts) != 1:
            raise ValueError("an unstacked Packed has one part")
        rows = self.parts[0].shape[0]
        for name, t, p in zip(self.names, self.types, self.parts, strict=True):
            if t not in BLOCKS or row_problem(t, self.n) is not None:
                raise ValueError(f"{name}: {t.name}: {row_problem(t, self.n) or 'unsupported'}")
            want = (rows, row_bytes(t, self.n))
            # the kernels' only guarantee that they stay inside the file
            if p.dtype != np.uint8 or p.shape != want or not p.flags.c_contiguous:
                raise ValueError(f"{name}: {p.dtype} {p.shape} view, expected uint8 {want}")

    @property
    def shape(self) -> tuple[int, ...]:
        rows = self.parts[0].shape[0]
        return (len(self.parts), rows, self.n) if self.stacked else (rows, self.n)

    @property
    def is_q8_0(self) -> bool:
        """Every part is Q8_0: materialized as a QTensor of the file's own int8 and scales."""
        return all(t == T.Q8_0 for t in self.types)

    def layer(self, i: int) -> Packed:
        """Part i as an unstacked matrix."""
        return Packed(self.names[i:i + 1], self.types[i:i + 1], self.parts[i:i + 1], self.n,
                      False, self.fail)

    def into_f32(self, out: np.ndarray, done: Callable[[str], None] | None = None) -> None:
        """Decode into out (layers?, rows, >= n) float32; columns beyond n are not written."""
        for i, (name, t, part) in enumerate(zip(self.names, self.types, self.parts,
                                                strict=True)):
            dst = out[i] if self.stacked else out
            self._check_out(dst, np.float32, name)
            bad = np.zeros(part.shape[0], np.bool_)
            _rows_to_f32(_KIND[t], part, self.n, dst, bad, _HALF)
            self._finish(name, t, part, bad, done)

    def into_q8_0(self, values: np.ndarray, scales: np.ndarray,
                  done: Callable[[str], None] | None = None) -> None:
        """Decode into the engine's Q8_0 layout: values (layers?, rows, n_pad) uint8 q+128 and
        scales (layers?, rows, n_pad/32) float32, n_pad a multiple of 32 and >= n."""
        for i, (name, t, part) in enumerate(zip(self.names, self.types, self.parts,
                                                strict=True)):
            v, s = (values[i], scales[i]) if self.stacked else (values, scales)
            self._check_out(v, np.uint8, name)
            if s.dtype != np.float32 or s.shape != (part.shape[0], v.shape[1] // GROUP_SIZE) \
                    or v.shape[1] % GROUP_SIZE or not s.flags.c_contiguous:
                raise ValueError(f"{name}: scales {s.dtype} {s.shape} do not fit {v.shape}")
            bad = np.zeros(part.shape[0], np.bool_)
            _rows_to_q8_0(_KIND[t], part, self.n, v, s, bad, _HALF)
            self._finish(name, t, part, bad, done)

    def dequantize(self) -> np.ndarray:
        """float32 of shape self.shape."""
        out = np.empty(self.shape, np.float32)
        self.into_f32(out)
        return out

    def materialize(self) -> np.ndarray | QTensor:
        """What a checkpoint held before loads were streamed: a QTensor with the file's int8
        values and scales when every part is Q8_0, else float32."""
        if not self.is_q8_0:
            return self.dequantize()
        groups = self.n // GROUP_SIZE
        values = np.empty(self.shape, np.uint8)
        scales = np.empty((*self.shape[:-1], groups), np.float32)
        self.into_q8_0(values, scales)
        return QTensor((values ^ np.uint8(0x80)).view(np.int8), scales)

    def _check_out(self, dst: np.ndarray, dtype: type, name: str) -> None:
        rows = self.parts[0].shape[0]
        if dst.dtype != dtype or dst.ndim != 2 or dst.shape[0] != rows \
                or dst.shape[1] < self.n or not dst.flags.c_contiguous:
            raise ValueError(f"{name}: output {dst.dtype} {dst.shape} cannot hold "
                             f"({rows}, {self.n}) {np.dtype(dtype)}")

    def _finish(self, name: str, t: T, part: np.ndarray, bad: np.ndarray,
                done: Callable[[str], None] | None) -> None:
        if bad.any():
            raise self.fail(f"tensor {name} ({t.name}) decodes to non-finite values in "
                            f"{int(bad.sum())} of its {len(bad)} rows (corrupt scales?)")
        release(part)
        if done is not None:
            done(name)


def release(view: np.ndarray) -> None:
    """Let the kernel drop the pages of a decoded read-only view of a memory-mapped file from
    this process (they stay in the page cache, and a later read faults them back in): without
    this a load would hold the whole source file resident beside the engine's arrays. Views of
    anything else, or writable ones (a copy-on-write map would lose its changes), are left."""
    base = view.base
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or view.nbytes == 0 or view.flags.writeable:
        return
    start = view.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
    page = mmap.PAGESIZE
    lo = start // page * page
    hi = -(-(start + view.nbytes) // page) * page
    base.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(base)) - lo)


# -----------------------------------------------------------------------------------------------
# random blocks, for tests and benchmarks


def random_blocks(ggml_type: T, rows: int, n: int, rng: np.random.Generator,
                  scale: float = 0.02) -> np.ndarray:
    """(rows, row_bytes) uint8: valid random rows of `ggml_type` whose values are of the order
    of `scale` -- random bits for the quants, float16 scales set to finite positive values
    (random bits there would give infinities and NaNs)."""
    if ggml_type not in BLOCKS or row_problem(ggml_type, n) is not None:
        raise ValueError(f"{ggml_type.name}: {row_problem(ggml_type, n) or 'unsupported'}")
    block, nbytes = BLOCKS[ggml_type]
    if ggml_type in (T.F32, T.F16, T.BF16):
        x = rng.standard_normal((rows, n), np.float32) * np.float32(scale)
        if ggml_type == T.BF16:
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.astype(np.float32 if ggml_type == T.F32 else np.float16).view(np.uint8)
    blocks = rng.integers(0, 256, (rows, n // block, nbytes), np.uint8)
    # where the f16 scales are, and the largest |q| * sub-scale they multiply
    fields = {T.Q4_0: ([0], 8), T.Q4_1: ([0, 2], 15), T.Q5_0: ([0], 16), T.Q5_1: ([0, 2], 31),
              T.Q8_0: ([0], 127), T.Q2_K: ([80, 82], 45), T.Q3_K: ([108], 128),
              T.Q4_K: ([0, 2], 945), T.Q5_K: ([0, 2], 1953), T.Q6_K: ([208], 4096)}
    offsets, span = fields[ggml_type]
    for o in offsets:
        d = rng.uniform(0.5, 1.5, (rows, n // block)) * (scale / span)
        blocks[..., o:o + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)

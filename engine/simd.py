"""Dot-product tiles written as LLVM vector IR, called from numba kernels as intrinsics.

Numba's auto-vectorizer gives up on 32-wide int8 groups (it widens int8 products to int64), so
the inner loops of the matmuls are emitted by hand here. Writing the IR ourselves also fixes the
floating-point evaluation order: every output element is computed by the same sequence of
operations whatever the tile it falls in, the batch size or the thread count, which is what
makes logits batch-invariant. All float operations are plain IEEE ops (`fma` is the correctly
rounded fused intrinsic), so the portable path gives the same bits as the VNNI one.

A tile computes `out[b0+j, r0+i] = dot(w[r0+i], x[b0+j])` for i < rows, j < cols, keeping every
weight chunk it loads in registers for all `cols` activation rows.

Q8_0 layout (see engine/weights.py): weights are stored as uint8 `w + 128` so that VNNI's
`vpdpbusd` (unsigned x signed bytes) applies; the offset is removed exactly by starting each
integer sum at `xc = -128 * sum(x)` over the lane's four activations, which the activation
quantizer computes once per row (engine/kernels.py). Rows are padded with zero groups to a
multiple of Q8_CHUNK.
Per 64-byte chunk (two groups) and lane k (16 lanes, lanes 0-7 group 2c, 8-15 group 2c+1):
    isum[k] = sum_{i<4} w[64c + 4k + i] * x[64c + 4k + i]            (exact int32)
    acc[k]  = fma(float(isum[k]), ws[g(k)] * xs[g(k)], acc[k])
and the 16 lanes are summed by a fixed pairwise tree at the end.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
Q8_CHUNK = 64  # int8 values per step of the Q8_0 tile: one 512-bit vector, two groups
F32_CHUNK = 16  # float32 values per step of the f32 tile

_i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_v64i8 = ir.VectorType(_i8, Q8_CHUNK)
_v64i32 = ir.VectorType(_i32, Q8_CHUNK)
_v16i32 = ir.VectorType(_i32, LANES)
_v16f = ir.VectorType(_f32, LANES)


def _target_has_vnni() -> bool:
    """True when numba compiles for a CPU with AVX512-VNNI (numba's target, not just the host)."""
    if os.environ.get("TILLER_SIMD", "").lower() == "generic":
        return False
    # a pinned target (e.g. portable caches): trust only its features
    if numba.config.CPU_NAME:  # type: ignore[attr-defined]
        features = numba.config.CPU_FEATURES or ""  # type: ignore[attr-defined]
    else:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512vnni" in features.split(",")


HAS_VNNI = _target_has_vnni()


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_i32, len(values)), values)


def _sum_quads(builder: ir.IRBuilder, products: ir.Value) -> ir.Value:
    """<64 x i32> -> <16 x i32>, lane k = sum of products 4k..4k+3 (integers: order is moot)."""
    parts = [builder.shuffle_vector(products, products, _mask(list(range(i, Q8_CHUNK, 4))))
             for i in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _dpbusd(builder: ir.IRBuilder, acc: ir.Value, a_u8: ir.Value, b_s8: ir.Value,
            vnni: bool) -> ir.Value:
    """acc + per-lane sum of 4 products of unsigned bytes of a and signed bytes of b."""
    if vnni:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_v16i32, [_v16i32, _v16i32, _v16i32]),
            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(a_u8, _v16i32),
                                 builder.bitcast(b_s8, _v16i32)])
    products = builder.mul(builder.zext(a_u8, _v64i32), builder.sext(b_s8, _v64i32))
    return builder.add(acc, _sum_quads(builder, products))


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16f, [_v16f] * 3),
                                        "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _reduce_lanes(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum 16 float lanes by a fixed pairwise tree (halves added until one lane is left)."""
    n = LANES
    while n > 1:
        h = n // 2
        v = builder.fadd(builder.shuffle_vector(v, v, _mask(list(range(h)))),
                         builder.shuffle_vector(v, v, _mask(list(range(h, n)))))
        n = h
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _row_ptr(builder: ir.IRBuilder, arr, row: ir.Value) -> ir.Value:
    """Pointer to arr[row, 0] of a C-contiguous 2-D array."""
    stride = builder.extract_value(arr.strides, 0)
    base = builder.ptrtoint(arr.data, stride.type)
    addr = builder.add(base, builder.mul(row, stride))
    return builder.inttoptr(addr, arr.data.type)


def _load_vec(builder: ir.IRBuilder, ptr: ir.Value, index: ir.Value, vec_type: ir.VectorType):
    elem = builder.gep(ptr, [index])
    return builder.load(builder.bitcast(elem, vec_type.as_pointer()), align=1)


def _q8_body(builder, w_rows, ws_rows, x_rows, xs_rows, xc_rows, acc_slots, c, vnni):
    index = builder.mul(c, ir.Constant(c.type, Q8_CHUNK))
    sindex = builder.mul(c, ir.Constant(c.type, 2))
    lindex = builder.mul(c, ir.Constant(c.type, LANES))
    spread = _mask([0] * 8 + [1] * 8)
    v2f = ir.VectorType(_f32, 2)
    w_vecs = [_load_vec(builder, p, index, _v64i8) for p in w_rows]
    w_scales = [builder.shuffle_vector(v, v, spread)
                for v in (_load_vec(builder, p, sindex, v2f) for p in ws_rows)]
    for j, (xp, xsp, xcp) in enumerate(zip(x_rows, xs_rows, xc_rows, strict=True)):
        x_vec = _load_vec(builder, xp, index, _v64i8)
        start = _load_vec(builder, xcp, lindex, _v16i32)  # cancels the weights' +128
        xsv = _load_vec(builder, xsp, sindex, v2f)
        x_scale = builder.shuffle_vector(xsv, xsv, spread)
        for i, (w_vec, w_scale) in enumerate(zip(w_vecs, w_scales, strict=True)):
            isum = _dpbusd(builder, start, w_vec, x_vec, vnni)
            slot = acc_slots[i][j]
            scaled = builder.fmul(w_scale, x_scale)
            builder.store(_fma(builder, builder.sitofp(isum, _v16f), scaled, builder.load(slot)),
                          slot)


def _f32_body(builder, w_rows, ws_rows, x_rows, xs_rows, xc_rows, acc_slots, c, vnni):
    index = builder.mul(c, ir.Constant(c.type, F32_CHUNK))
    w_vecs = [_load_vec(builder, p, index, _v16f) for p in w_rows]
    for j, xp in enumerate(x_rows):
        x_vec = _load_vec(builder, xp, index, _v16f)
        for i, w_vec in enumerate(w_vecs):
            slot = acc_slots[i][j]
            builder.store(_fma(builder, w_vec, x_vec, builder.load(slot)), slot)


def make_tile(rows: int, cols: int, vnni: bool = HAS_VNNI):
    """An intrinsic tile(out, x, xs, xc, w, ws, r0, b0) computing a rows x cols block of out.

    Q8_0: x int8 (T, n), xs float32 (T, n/32), xc int32 (T, n/4), w uint8 (d, n), ws float32
    (d, n/32), n a multiple of Q8_CHUNK. f32: x and w float32 with n a multiple of F32_CHUNK;
    xs, xc and ws are ignored.
    out is float32 (T, d). No bounds checks: the caller guarantees r0+rows <= d, b0+cols <= T.
    """

    @intrinsic
    def tile(typingctx, out, x, xs, xc, w, ws, r0, b0):
        if isinstance(w, types.Array) and w.dtype == types.uint8:
            body, chunk = _q8_body, Q8_CHUNK
        elif isinstance(w, types.Array) and w.dtype == types.float32:
            body, chunk = _f32_body, F32_CHUNK
        else:
            return None
        sig = types.void(out, x, xs, xc, w, ws, r0, b0)

        def codegen(context, builder, signature, args):
            out_a, x_a, xs_a, xc_a, w_a, ws_a = (
                context.make_array(t)(context, builder, v)
                for t, v in zip(signature.args[:6], args[:6], strict=True))
            r0_v = context.cast(builder, args[6], signature.args[6], types.intp)
            b0_v = context.cast(builder, args[7], signature.args[7], types.intp)
            intp = r0_v.type
            rows_idx = [builder.add(r0_v, ir.Constant(intp, i)) for i in range(rows)]
            cols_idx = [builder.add(b0_v, ir.Constant(intp, j)) for j in range(cols)]
            w_rows = [_row_ptr(builder, w_a, r) for r in rows_idx]
            ws_rows = [_row_ptr(builder, ws_a, r) for r in rows_idx]
            x_rows = [_row_ptr(builder, x_a, b) for b in cols_idx]
            xs_rows = [_row_ptr(builder, xs_a, b) for b in cols_idx]
            xc_rows = [_row_ptr(builder, xc_a, b) for b in cols_idx]
            n = builder.extract_value(w_a.shape, 1)
            n_chunks = builder.sdiv(n, ir.Constant(intp, chunk))
            acc_slots = [[cgutils.alloca_once_value(builder, ir.Constant(_v16f, [0.0] * LANES))
                          for _ in range(cols)] for _ in range(rows)]
            with cgutils.for_range(builder, n_chunks) as loop:
                body(builder, w_rows, ws_rows, x_rows, xs_rows, xc_rows, acc_slots, loop.index,
                     vnni)
            for i, r in enumerate(rows_idx):
                for j, b in enumerate(cols_idx):
                    total = _reduce_lanes(builder, builder.load(acc_slots[i][j]))
                    out_row = _row_ptr(builder, out_a, b)
                    builder.store(total, builder.gep(out_row, [r]))
            return context.get_dummy_value()

        return sig, codegen

    return tile

"""Dot-product tiles written as LLVM vector IR, called from numba kernels as intrinsics.

Numba's auto-vectorizer gives up on int8 dot products (it widens int8 products to int64), so
the inner loops of the matmuls are emitted by hand here. Writing the IR ourselves also fixes the
floating-point evaluation order: every output element is computed by the same sequence of
operations whatever the tile it falls in, the batch size, the thread count or the instruction
set, which is what makes logits batch-invariant and every path give the same bits.

Q8_0 (see engine/weights.py for the layout): weights are uint8 `w + 128`, interleaved in blocks
of ROW_BLOCK = 16 rows: w3[rb, k, 4 i + j] = w[16 rb + i, 4 k + j] + 128, scales
ws3[rb, g, i] = ws[16 rb + i, g]. One 64-byte vector then holds one 4-byte quad of 16 rows:
VNNI's `vpdpbusd` with a broadcast activation quad adds 16 rows' quad dot products at once,
and it is AMX's B-operand layout too. The contract, for output (b, r), groups g = 0, 1, ...:
    isum_g = xc[b, g] + sum_{k<32} w_u8[r, 32 g + k] * x[b, 32 g + k]      (exact int32)
    acc    = fma(float(isum_g), ws[r, g] * xs[b, g], acc)                   (acc starts at 0)
where xc[b, g] = -128 * sum of the group's activations cancels the +128 exactly (the activation
quantizer computes it, engine/kernels.py). Integer sums are exact in any order, so each path
(VNNI, AMX, the portable IR) may form isum_g however it likes; the float steps are the same.

f32: a tile keeps `rows` weight rows in registers for `cols` activation rows; per 16-float
chunk c, lane k: acc[k] = fma(w[16 c + k], x[16 c + k], acc[k]), the lanes summed at the end by
a fixed pairwise tree.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
ROW_BLOCK = 16  # Q8_0 weight rows interleaved together: one int32 lane each
Q8_CHUNK = 64  # Q8_0 rows are padded to a multiple of this many values (two groups)
F32_CHUNK = 16  # float32 values per step of the f32 tile
QUADS = 8  # 4-byte quads per group of 32

_i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_v64i8 = ir.VectorType(_i8, Q8_CHUNK)
_v64i32 = ir.VectorType(_i32, Q8_CHUNK)
_v16i32 = ir.VectorType(_i32, LANES)
_v16f = ir.VectorType(_f32, LANES)


SIMD_CHOICES = ("vnni", "generic")


def _target_has_vnni() -> bool:
    """True when numba compiles for a CPU with AVX512-VNNI (numba's target, not just the host);
    TILLER_SIMD=generic forces the portable IR, =vnni insists on VNNI."""
    choice = os.environ.get("TILLER_SIMD", "").lower()
    if choice and choice not in SIMD_CHOICES:
        raise ValueError(f"TILLER_SIMD must be one of {SIMD_CHOICES}, got {choice!r}")
    if choice == "generic":
        return False
    # a pinned target (e.g. portable caches): trust only its features
    if numba.config.CPU_NAME:  # type: ignore[attr-defined]
        features = numba.config.CPU_FEATURES or ""  # type: ignore[attr-defined]
    else:
        features = llvm.get_host_cpu_features().flatten()
    has = "+avx512vnni" in features.split(",")
    if choice == "vnni" and not has:
        raise ValueError("TILLER_SIMD=vnni, but the compile target has no AVX512-VNNI")
    return has


HAS_VNNI = _target_has_vnni()


def _target_has_bf16() -> bool:
    """True when numba compiles for AVX512-BF16 (vdpbf16ps) and TILLER_SIMD is not generic."""
    if os.environ.get("TILLER_SIMD", "").lower() == "generic":
        return False
    if numba.config.CPU_NAME:  # type: ignore[attr-defined]
        features = numba.config.CPU_FEATURES or ""  # type: ignore[attr-defined]
    else:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512bf16" in features.split(",")


HAS_BF16 = _target_has_bf16()


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


def _ftz(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Subnormal lanes to zero of their sign (what vdpbf16ps does to each of its results)."""
    bits = builder.bitcast(v, _v16i32)
    exponent = builder.and_(bits, ir.Constant(_v16i32, [0x7F800000] * LANES))
    tiny = builder.icmp_unsigned("==", exponent, ir.Constant(_v16i32, [0] * LANES))
    signed_zero = builder.and_(bits, ir.Constant(_v16i32, [-0x80000000] * LANES))
    return builder.bitcast(builder.select(tiny, signed_zero, bits), _v16f)


def _dpbf16(builder: ir.IRBuilder, acc: ir.Value, a: ir.Value, b: ir.Value,
            native: bool) -> ir.Value:
    """acc + a . b per lane, a and b <16 x i32> each holding two bfloat16 (low half: element 0):
    fma(a1, b1, acc), then fma(a0, b0, that), each result's subnormals flushed -- vdpbf16ps's
    arithmetic (products of bfloat16 are exact in float32, so each step is one rounding),
    which the portable IR repeats bit for bit. Inputs are never subnormal: to_bf16 flushes
    them when it rounds."""
    if native:
        # NOTE: declared with i32 vectors, the pre-LLVM 17 signature, which LLVM's IR parser
        # upgrades (llvmlite has no bfloat type)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_v16f, [_v16f, _v16i32, _v16i32]),
            "llvm.x86.avx512bf16.dpbf16ps.512")
        return builder.call(fn, [acc, a, b])
    high = ir.Constant(_v16i32, [-0x10000] * LANES)
    shift = ir.Constant(_v16i32, [16] * LANES)
    a1, b1 = (builder.bitcast(builder.and_(x, high), _v16f) for x in (a, b))
    a0, b0 = (builder.bitcast(builder.shl(x, shift), _v16f) for x in (a, b))
    acc = _ftz(builder, _fma(builder, a1, b1, acc))
    return _ftz(builder, _fma(builder, a0, b0, acc))


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


def _f32_body(builder, w_rows, ws_rows, x_rows, xs_rows, xc_rows, acc_slots, c, vnni):
    """acc[i][j] += w[r_i] * x[b_j] over one 16-float chunk c, lane by lane."""
    index = builder.mul(c, ir.Constant(c.type, F32_CHUNK))
    w_vecs = [_load_vec(builder, p, index, _v16f) for p in w_rows]
    for j, xp in enumerate(x_rows):
        x_vec = _load_vec(builder, xp, index, _v16f)
        for i, w_vec in enumerate(w_vecs):
            slot = acc_slots[i][j]
            builder.store(_fma(builder, w_vec, x_vec, builder.load(slot)), slot)


def _unreachable(context, builder, signature, args):
    """The codegen of a tile called with the other dtype's weights: `linear` types both of its
    branches for either dtype, and is_q8's constant removes the wrong one, so this never runs."""
    return context.get_dummy_value()


def make_tile(rows: int, cols: int, vnni: bool = HAS_VNNI):
    """An f32 intrinsic tile(out, x, xs, xc, w, ws, r0, b0) computing a rows x cols block of
    out (T, d) = x (T, n) @ w (d, n).T, n a multiple of F32_CHUNK; xs, xc and ws are ignored.
    No bounds checks: the caller guarantees r0+rows <= d, b0+cols <= T.
    """

    @intrinsic
    def tile(typingctx, out, x, xs, xc, w, ws, r0, b0):
        body, chunk = _f32_body, F32_CHUNK
        sig = types.void(out, x, xs, xc, w, ws, r0, b0)
        if not (isinstance(w, types.Array) and w.dtype == types.float32):
            return sig, _unreachable

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


def _broadcast(builder: ir.IRBuilder, value: ir.Value, vec_type: ir.VectorType) -> ir.Value:
    """value in every lane of vec_type."""
    one = builder.insert_element(ir.Constant(vec_type, None), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, one, _mask([0] * vec_type.count))


def _load_scalar(builder: ir.IRBuilder, ptr: ir.Value, index: ir.Value, ty: ir.Type):
    elem = builder.gep(ptr, [index])
    return builder.load(builder.bitcast(elem, ty.as_pointer()), align=1)


def _store_rows(builder: ir.IRBuilder, value: ir.Value, row_ptr: ir.Value, r0: ir.Value,
                d: ir.Value) -> None:
    """out_row[r0:r0+16] = value, only the lanes with r0 + lane < d (the last block's tail)."""
    intp = r0.type
    full = builder.icmp_signed("<=", builder.add(r0, ir.Constant(intp, LANES)), d)
    with builder.if_else(full) as (then, otherwise):
        with then:
            ptr = builder.bitcast(builder.gep(row_ptr, [r0]), _v16f.as_pointer())
            builder.store(value, ptr, align=1)
        with otherwise:
            for k in range(LANES):
                r = builder.add(r0, ir.Constant(intp, k))
                with builder.if_then(builder.icmp_signed("<", r, d)):
                    builder.store(builder.extract_element(value, ir.Constant(_i32, k)),
                                  builder.gep(row_ptr, [r]))


def make_qtile(blocks: int, cols: int, vnni: bool = HAS_VNNI):
    """A Q8_0 intrinsic qtile(out, x, xs, xc, w, ws, rb0, b0): out[b0+j, 16 (rb0+i) + k] for
    i < blocks, j < cols, k < 16 (rows >= d of the last block are not written).

    x int8 (T, n), xs float32 (T, n/32), xc int32 (T, n/32), w uint8 (d16/16, n/4, 64), ws
    float32 (d16/16, n/32, 16); out float32 (T, d). n a multiple of 32. No bounds checks: the
    caller guarantees rb0+blocks <= d16/16 and b0+cols <= T. Every output follows the module's
    contract.
    """

    # two int32 chains per output vector (even and odd quads) hide vpdpbusd's latency when
    # the registers allow: 32 zmm hold the chains, the float accumulators, weights and x
    chains = 2 if 3 * blocks * cols + blocks + 1 <= 32 else 1

    @intrinsic
    def qtile(typingctx, out, x, xs, xc, w, ws, rb0, b0):
        sig = types.void(out, x, xs, xc, w, ws, rb0, b0)
        if not (isinstance(w, types.Array) and w.dtype == types.uint8 and w.ndim == 3):
            return sig, _unreachable

        def codegen(context, builder, signature, args):
            out_a, x_a, xs_a, xc_a, w_a, ws_a = (
                context.make_array(t)(context, builder, v)
                for t, v in zip(signature.args[:6], args[:6], strict=True))
            rb_v = context.cast(builder, args[6], signature.args[6], types.intp)
            b_v = context.cast(builder, args[7], signature.args[7], types.intp)
            intp = rb_v.type
            blocks_idx = [builder.add(rb_v, ir.Constant(intp, i)) for i in range(blocks)]
            cols_idx = [builder.add(b_v, ir.Constant(intp, j)) for j in range(cols)]
            w_ptrs = [_row_ptr(builder, w_a, r) for r in blocks_idx]
            ws_ptrs = [_row_ptr(builder, ws_a, r) for r in blocks_idx]
            x_ptrs = [_row_ptr(builder, x_a, b) for b in cols_idx]
            xs_ptrs = [_row_ptr(builder, xs_a, b) for b in cols_idx]
            xc_ptrs = [_row_ptr(builder, xc_a, b) for b in cols_idx]
            n_groups = builder.extract_value(xs_a.shape, 1)
            zero_f = ir.Constant(_v16f, [0.0] * LANES)
            zero_i = ir.Constant(_v16i32, [0] * LANES)
            acc_slots = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(cols)]
                         for _ in range(blocks)]
            with cgutils.for_range(builder, n_groups) as loop:
                g = loop.index
                starts = [_broadcast(builder, _load_scalar(builder, p, g, _i32), _v16i32)
                          for p in xc_ptrs]
                isums = [[[starts[j], zero_i][:chains] for j in range(cols)]
                         for _ in range(blocks)]
                for q in range(QUADS):
                    k = builder.add(builder.mul(g, ir.Constant(intp, QUADS)), ir.Constant(intp, q))
                    w_vecs = [_load_vec(builder, p, builder.mul(k, ir.Constant(intp, 64)),
                                        _v64i8) for p in w_ptrs]
                    for j, xp in enumerate(x_ptrs):
                        quad = _load_scalar(builder, xp, builder.mul(k, ir.Constant(intp, 4)),
                                            _i32)
                        x_vec = builder.bitcast(_broadcast(builder, quad, _v16i32), _v64i8)
                        for i, w_vec in enumerate(w_vecs):
                            chain = isums[i][j]
                            c = q % chains
                            chain[c] = _dpbusd(builder, chain[c], w_vec, x_vec, vnni)
                w_scales = [_load_vec(builder, p, builder.mul(g, ir.Constant(intp, LANES)), _v16f)
                            for p in ws_ptrs]
                x_scales = [_broadcast(builder, _load_scalar(builder, p, g, _f32), _v16f)
                            for p in xs_ptrs]
                for i in range(blocks):
                    for j in range(cols):
                        isum = isums[i][j][0]
                        for part in isums[i][j][1:]:
                            isum = builder.add(isum, part)
                        scaled = builder.fmul(w_scales[i], x_scales[j])
                        slot = acc_slots[i][j]
                        builder.store(_fma(builder, builder.sitofp(isum, _v16f), scaled,
                                           builder.load(slot)), slot)
            d = builder.extract_value(out_a.shape, 1)
            for i, rb in enumerate(blocks_idx):
                r0 = builder.mul(rb, ir.Constant(intp, ROW_BLOCK))
                for j, b in enumerate(cols_idx):
                    _store_rows(builder, builder.load(acc_slots[i][j]),
                                _row_ptr(builder, out_a, b), r0, d)
            return context.get_dummy_value()

        return sig, codegen

    return qtile


def _tuple_arrays(context, builder, tuple_type, value) -> list:
    """The array structs of a UniTuple of arrays."""
    return [context.make_array(tuple_type.dtype)(context, builder,
                                                 builder.extract_value(value, i))
            for i in range(tuple_type.count)]


def make_scores(blocks: int, native_bf16: bool = HAS_BF16):
    """An intrinsic scores(atts, qs, k_cache, layer, table, b0, k0): for each row r of the
    tuples (query qs[r], scores atts[r]) and the KV blocks b = b0..b0+blocks-1 of a sequence
    (block ids in table), atts[r][16 b + i] = sum over d of qs[r][d] * k_cache[layer, table[b],
    k0 + d, i], d = 0, 1, ... in order, one fma chain per row and block (keys transposed per
    block: k_cache (L, n_blocks, kv_dim, 16)). Rows share each key load, and a row's chain is
    the same operations whichever call, with however many rows, computes it. qs[r] contiguous
    (head_dim,) float32 arrays.

    bfloat16 keys (uint16 k_cache (L, n_blocks, kv_dim / 2, 16, 2): dims in pairs, 16
    positions of each pair): qs[r] are bfloat16 (uint16) too, and each step of a chain is one
    _dpbf16 over a pair of dims, d = 1, 0, 3, 2, ...; k0 is still in dims.
    """

    @intrinsic
    def scores(typingctx, atts, qs, k_cache, layer, table, b0, k0):
        sig = types.void(atts, qs, k_cache, layer, table, b0, k0)
        rows = atts.count
        return sig, _scores_codegen(blocks, rows, k_cache.dtype == types.uint16, native_bf16)

    return scores


def _scores_codegen(blocks: int, rows: int, bf16: bool, native: bool):
    """make_scores' body: float32 keys and queries, one fma per dim; or bfloat16 ones, one
    _dpbf16 per pair of dims."""

    def codegen(context, builder, signature, args):
        att_as = _tuple_arrays(context, builder, signature.args[0], args[0])
        q_as = _tuple_arrays(context, builder, signature.args[1], args[1])
        k_a, table_a = (context.make_array(signature.args[i])(context, builder, args[i])
                        for i in (2, 4))
        layer_v, b0_v, k0_v = (context.cast(builder, args[i], signature.args[i], types.intp)
                               for i in (3, 5, 6))
        intp = layer_v.type
        per_step = ir.Constant(intp, 2 if bf16 else 1)  # dims a step of the chain takes
        s0, s1, s2 = (builder.extract_value(k_a.strides, i) for i in range(3))
        table_t = signature.args[4].dtype
        base = builder.add(builder.ptrtoint(k_a.data, intp), builder.mul(layer_v, s0))
        base = builder.add(base, builder.mul(builder.sdiv(k0_v, per_step), s2))
        block_ptrs = []
        for j in range(blocks):
            bj = builder.add(b0_v, ir.Constant(intp, j))
            blk = builder.load(builder.gep(table_a.data, [bj]))
            blk = context.cast(builder, blk, table_t, types.intp)
            block_ptrs.append(builder.add(base, builder.mul(blk, s1)))
        steps = builder.sdiv(builder.extract_value(q_as[0].shape, 0), per_step)
        lane_t, q_t = (_v16i32, _i32) if bf16 else (_v16f, _f32)
        q_ptrs = [builder.bitcast(q.data, q_t.as_pointer()) for q in q_as]
        slots = [[cgutils.alloca_once_value(builder, ir.Constant(_v16f, [0.0] * LANES))
                  for _ in range(rows)] for _ in range(blocks)]
        with cgutils.for_range(builder, steps) as loop:
            d = loop.index
            qds = [_broadcast(builder, builder.load(builder.gep(q, [d])), lane_t)
                   for q in q_ptrs]
            row = builder.mul(d, s2)
            for j in range(blocks):
                ptr = builder.inttoptr(builder.add(block_ptrs[j], row), lane_t.as_pointer())
                kv = builder.load(ptr, align=4)
                for r in range(rows):
                    slot = slots[j][r]
                    acc = builder.load(slot)
                    builder.store(_dpbf16(builder, acc, qds[r], kv, native) if bf16
                                  else _fma(builder, qds[r], kv, acc), slot)
        for j in range(blocks):
            at = builder.mul(builder.add(b0_v, ir.Constant(intp, j)), ir.Constant(intp, LANES))
            for r in range(rows):
                ptr = builder.bitcast(builder.gep(att_as[r].data, [at]), _v16f.as_pointer())
                builder.store(builder.load(slots[j][r]), ptr, align=4)
        return context.get_dummy_value()

    return codegen


@contextmanager
def _rows_by_block(context, builder: ir.IRBuilder, table_a, table_t, base: ir.Value,
                   s1: ir.Value, s2: ir.Value, r0: ir.Value, r1: ir.Value, per_block: int):
    """A loop over rows r0 <= r < r1 of a sequence's KV blocks (per_block rows to a block;
    the sequence's block b is table[b]), block by block, so that the table is read once per
    block and a row's address is one multiply-add: yields r and the row's address, base +
    block * s1 + (r % per_block) * s2."""
    intp = r0.type
    block = ir.Constant(intp, per_block)
    zero = ir.Constant(intp, 0)
    b_first = builder.sdiv(r0, block)
    b_end = builder.sdiv(builder.add(r1, ir.Constant(intp, per_block - 1)), block)
    with cgutils.for_range(builder, builder.sub(b_end, b_first)) as blocks_loop:
        b = builder.add(b_first, blocks_loop.index)
        blk = builder.load(builder.gep(table_a.data, [b]))
        blk = context.cast(builder, blk, table_t, types.intp)
        block_base = builder.add(base, builder.mul(blk, s1))
        r_base = builder.mul(b, block)
        i0 = builder.sub(r0, r_base)
        i0 = builder.select(builder.icmp_signed("<", i0, zero), zero, i0)
        i1 = builder.sub(r1, r_base)
        i1 = builder.select(builder.icmp_signed(">", i1, block), block, i1)
        with cgutils.for_range(builder, builder.sub(i1, i0)) as rows_loop:
            i = builder.add(i0, rows_loop.index)
            yield builder.add(r_base, i), builder.add(block_base, builder.mul(i, s2))


def make_weighted_sum(chunks: int, native_bf16: bool = HAS_BF16):
    """An intrinsic weighted_sum(os, ws, v_cache, layer, table, p0, p1, k0): for each row r of
    the tuples, os[r][c] += sum over p0 <= p < p1 (in order, one fma chain per 16 lanes, which
    starts from os[r]'s value) of ws[r][p] * v_cache[layer, table[p // 16], p % 16, k0 + c] for
    c < 16 chunks. Rows share each value load; a row's chain is the same operations whichever
    call computes it, and continuing a chain in a second call (p0 = the first call's p1)
    computes it exactly as one call would. os[r], ws[r] contiguous float32.

    bfloat16 values (uint16 v_cache (L, n_blocks, 8, kv_dim, 2): positions in pairs, each
    dim's pair together) and weights (ws[r] uint16): each step of a chain is one _dpbf16 over
    a pair of positions, p = 1, 0, 3, 2, ...; p0 must be even (a pair is never split between
    calls); an odd p1 ends in a pair whose second value is masked to 0.
    """

    @intrinsic
    def weighted_sum(typingctx, os, ws, v_cache, layer, table, p0, p1, k0):
        sig = types.void(os, ws, v_cache, layer, table, p0, p1, k0)
        rows = os.count
        return sig, _weighted_sum_codegen(chunks, rows, v_cache.dtype == types.uint16,
                                          native_bf16)

    return weighted_sum


def _weighted_sum_codegen(chunks: int, rows: int, bf16: bool, native: bool):
    """make_weighted_sum's body: float32 values and weights, one fma per position; or
    bfloat16 ones, one _dpbf16 per pair of positions."""

    def codegen(context, builder, signature, args):
        o_as = _tuple_arrays(context, builder, signature.args[0], args[0])
        w_as = _tuple_arrays(context, builder, signature.args[1], args[1])
        v_a, table_a = (context.make_array(signature.args[i])(context, builder, args[i])
                        for i in (2, 4))
        layer_v, p0_v, p1_v, k0_v = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (3, 5, 6, 7))
        intp = layer_v.type
        # strides: layer, block, position (or pair of positions), dim
        s0, s1, s2, s3 = (builder.extract_value(v_a.strides, i) for i in range(4))
        table_t = signature.args[4].dtype
        base = builder.add(builder.ptrtoint(v_a.data, intp), builder.mul(layer_v, s0))
        base = builder.add(base, builder.mul(k0_v, s3))
        o_ptrs = [[builder.bitcast(builder.gep(o.data, [ir.Constant(intp, LANES * c)]),
                                   _v16f.as_pointer()) for c in range(chunks)]
                  for o in o_as]
        lane_t, w_t = (_v16i32, _i32) if bf16 else (_v16f, _f32)
        w_ptrs = [builder.bitcast(w.data, w_t.as_pointer()) for w in w_as]
        slots = [[cgutils.alloca_once_value(builder, builder.load(o_ptrs[r][c], align=4))
                  for c in range(chunks)] for r in range(rows)]

        def add(p: ir.Value, row: ir.Value, keep: ir.Value | None) -> None:
            """Position p (a pair of them with bfloat16: p indexes pairs), its values at
            address row, into every row's sums; `keep` masks the values' lanes."""
            aps = [_broadcast(builder, builder.load(builder.gep(w, [p])), lane_t)
                   for w in w_ptrs]
            for c in range(chunks):
                addr = builder.add(row, builder.mul(ir.Constant(intp, LANES * c), s3))
                vv = builder.load(builder.inttoptr(addr, lane_t.as_pointer()), align=4)
                if keep is not None:
                    vv = builder.and_(vv, keep)
                for r in range(rows):
                    slot = slots[r][c]
                    acc = builder.load(slot)
                    builder.store(_dpbf16(builder, acc, aps[r], vv, native) if bf16
                                  else _fma(builder, aps[r], vv, acc), slot)

        walk = (context, builder, table_a, table_t, base, s1, s2)
        if not bf16:
            with _rows_by_block(*walk, p0_v, p1_v, LANES) as (p, row):
                add(p, row, None)
        else:
            two = ir.Constant(intp, 2)
            q1 = builder.sdiv(p1_v, two)  # whole pairs below p1
            with _rows_by_block(*walk, builder.sdiv(p0_v, two), q1, LANES // 2) as (q, row):
                add(q, row, None)
            # NOTE: an odd p1 ends inside a pair: its second position's weight is 0, but its
            # value is whatever the block held (another sequence's, even inf): masked to +0,
            # so 0 * it adds nothing whatever it was
            odd = builder.icmp_signed("!=", builder.srem(p1_v, two), ir.Constant(intp, 0))
            with builder.if_then(odd):
                last = builder.add(q1, ir.Constant(intp, 1))
                with _rows_by_block(*walk, q1, last, LANES // 2) as (q, row):
                    add(q, row, ir.Constant(_v16i32, [0xFFFF] * LANES))
        for r in range(rows):
            for c in range(chunks):
                builder.store(builder.load(slots[r][c]), o_ptrs[r][c], align=4)
        return context.get_dummy_value()

    return codegen


_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)  # Cephes expf on [-ln2/2, ln2/2]


def _vexp(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp of 16 lanes with x in [-87.3, 0] (clamped), Cephes' expf to about 1 ulp: plain IEEE
    operations, so every lane, call and CPU gives the same bits."""
    def const(v: float) -> ir.Constant:
        return ir.Constant(_v16f, [v] * LANES)

    lo = builder.fcmp_ordered("<", x, const(-87.3))
    x = builder.select(lo, const(-87.3), x)
    rnd = const(12582912.0)  # 1.5 * 2**23: round to nearest, as kernels._ROUND
    n = builder.fsub(builder.fadd(builder.fmul(x, const(1.44269504088896341)), rnd), rnd)
    r = builder.fsub(builder.fsub(x, builder.fmul(n, const(0.693359375))),
                     builder.fmul(n, const(-2.12194440e-4)))
    p = const(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = builder.fadd(builder.fmul(p, r), const(c))
    y = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), const(1.0))
    bits = builder.shl(builder.add(builder.fptosi(n, _v16i32), ir.Constant(_v16i32, [127] * LANES)),
                       ir.Constant(_v16i32, [23] * LANES))
    return builder.fmul(y, builder.bitcast(bits, _v16f))


def _max_lanes(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The largest of 16 float lanes (NaN lanes ignored; exact in any order)."""
    n = LANES
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, _mask(list(range(h))))
        hi = builder.shuffle_vector(v, v, _mask(list(range(h, n))))
        v = builder.select(builder.fcmp_ordered(">", hi, lo), hi, lo)
        n = h
    return builder.extract_element(v, ir.Constant(_i32, 0))


@contextmanager
def _chunks_of(context, builder: ir.IRBuilder, signature, args):
    """For an intrinsic f(a, n, x) over a contiguous float32 a: a loop over a's 16-lane chunks
    up to n, yielding (x, the chunk's pointer, its lanes < n); x cast to float32."""
    a_a = context.make_array(signature.args[0])(context, builder, args[0])
    n_v = context.cast(builder, args[1], signature.args[1], types.intp)
    x_v = context.cast(builder, args[2], signature.args[2], types.float32)
    intp = n_v.type
    chunks = builder.sdiv(builder.add(n_v, ir.Constant(intp, LANES - 1)), ir.Constant(intp, LANES))
    lanes = ir.Constant(_v16i32, list(range(LANES)))
    with cgutils.for_range(builder, chunks) as loop:
        at = builder.mul(loop.index, ir.Constant(intp, LANES))
        ptr = builder.bitcast(builder.gep(a_a.data, [at]), _v16f.as_pointer())
        left = builder.trunc(builder.sub(n_v, at), _i32)
        yield x_v, ptr, builder.icmp_signed("<", lanes, _broadcast(builder, left, _v16i32))


@intrinsic
def scale_max(typingctx, a, n, scale):
    """a[p] *= scale for p < n (a's length a multiple of 16 and >= n; lanes past n are scaled
    too, and ignored), returning the largest a[p], p < n (NaN ignored; -inf for n = 0)."""
    sig = types.float32(a, n, scale)

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, ir.Constant(_v16f, [float("-inf")] * LANES))
        with _chunks_of(context, builder, signature, args) as (scale_v, ptr, keep):
            v = builder.fmul(builder.load(ptr, align=4), _broadcast(builder, scale_v, _v16f))
            builder.store(v, ptr, align=4)
            top = builder.load(slot)
            bigger = builder.and_(keep, builder.fcmp_ordered(">", v, top))
            builder.store(builder.select(bigger, v, top), slot)
        return _max_lanes(builder, builder.load(slot))

    return sig, codegen


@intrinsic
def exp_sum(typingctx, a, n, top):
    """a[p] = exp(a[p] - top) for p < n (a's length a multiple of 16 and >= n; lanes past n
    become 0), returning their sum: 16 lane sums in order, then the fixed pairwise tree."""
    sig = types.float32(a, n, top)

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, ir.Constant(_v16f, [0.0] * LANES))
        with _chunks_of(context, builder, signature, args) as (top_v, ptr, keep):
            top_b = _broadcast(builder, top_v, _v16f)
            e = _vexp(builder, builder.fsub(builder.load(ptr, align=4), top_b))
            e = builder.select(keep, e, ir.Constant(_v16f, [0.0] * LANES))
            builder.store(e, ptr, align=4)
            builder.store(builder.fadd(builder.load(slot), e), slot)
        return _reduce_lanes(builder, builder.load(slot))

    return sig, codegen


def _round_bf16(builder: ir.IRBuilder, bits: ir.Value, ty: ir.Type) -> ir.Value:
    """float32 bits (i32 or <16 x i32>) to bfloat16 bits in the low half: round to nearest
    even, subnormals to +0 (vdpbf16ps would read them as 0: a path that reads them as
    numbers would give other bits), NaN to the quiet NaN 0x7FC0."""
    def const(v: int) -> ir.Constant:
        return ir.Constant(ty, [v] * LANES) if isinstance(ty, ir.VectorType) else ir.Constant(ty, v)

    odd = builder.and_(builder.lshr(bits, const(16)), const(1))
    rounded = builder.lshr(builder.add(builder.add(bits, const(0x7FFF)), odd), const(16))
    tiny = builder.icmp_unsigned("==", builder.and_(bits, const(0x7F800000)), const(0))
    nan = builder.icmp_unsigned(">", builder.and_(bits, const(0x7FFFFFFF)), const(0x7F800000))
    return builder.select(nan, const(0x7FC0), builder.select(tiny, const(0), rounded))


@intrinsic
def to_bf16(typingctx, x):
    """float32 x as bfloat16 bits (uint16): _round_bf16."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        x_v = context.cast(builder, args[0], signature.args[0], types.float32)
        bits = _round_bf16(builder, builder.bitcast(x_v, _i32), _i32)
        return builder.trunc(bits, ir.IntType(16))

    return sig, codegen


@intrinsic
def bf16_weights(typingctx, wb, att, n, total):
    """wb[p] = bfloat16 of att[p] / total (the float32 quotient rounded by _round_bf16), for p
    up to n rounded up to 32 (att and wb at least that long; att[p] past n is 0 where a pair
    of weights needs it, as exp_sum leaves it)."""
    sig = types.void(wb, att, n, total)

    def codegen(context, builder, signature, args):
        wb_a, att_a = (context.make_array(signature.args[i])(context, builder, args[i])
                       for i in (0, 1))
        n_v = context.cast(builder, args[2], signature.args[2], types.intp)
        total_v = _broadcast(builder, context.cast(builder, args[3], signature.args[3],
                                                   types.float32), _v16f)
        intp = n_v.type
        step = 2 * LANES
        chunks = builder.sdiv(builder.add(n_v, ir.Constant(intp, step - 1)),
                              ir.Constant(intp, step))
        v32i16 = ir.VectorType(ir.IntType(16), step)
        with cgutils.for_range(builder, chunks) as loop:
            at = builder.mul(loop.index, ir.Constant(intp, step))
            halves = []
            for h in range(2):
                ptr = builder.bitcast(builder.gep(att_a.data, [builder.add(
                    at, ir.Constant(intp, h * LANES))]), _v16f.as_pointer())
                w = builder.fdiv(builder.load(ptr, align=4), total_v)
                halves.append(_round_bf16(builder, builder.bitcast(w, _v16i32), _v16i32))
            both = builder.shuffle_vector(halves[0], halves[1], _mask(list(range(step))))
            out = builder.bitcast(builder.gep(wb_a.data, [at]), v32i16.as_pointer())
            builder.store(builder.trunc(both, v32i16), out, align=2)
        return context.get_dummy_value()

    return sig, codegen

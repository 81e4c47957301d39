"""Integer-activation row products for the decode kernels (llama.cpp's q8_0 x q8_0 and q4_0 x q8_0 route).

The activation row x (K,) is quantized per block of :data:`QBLOCK` inputs (a shorter last block when K is not a
multiple): ``d = max|x_block| / 127`` (0 for an all-zero block), ``q = round_half_even(x / d)`` in [-127, 127]
(:func:`quantize_rows`). A weight row then multiplies integers: each block's int8 x int8 (or int4 nibble x int8)
products are summed exactly in int32, and only the block sum is converted to float and scaled by ``d`` (and, for
int4, by the weight group's scale). The int32 block sums use ``vpmaddwd`` (16-bit pairs multiplied and added) on
x86 with AVX-512BW and a plain sign-extend, multiply and pairwise add elsewhere (LLVM lowers it for any target).
Oracle: :func:`ssmkit.ops.reference.q8_linear` (the same activation quantization, then a float64 product with
the dequantized weight).

Row kernels take x's quantized form (``xq`` (B, K) int8, ``xd`` (B, blocks) scales in x's dtype), the weight
and its scale, and write ``buf[o - lo, b]`` like :func:`ssmkit.ops._numba_decode._rows_block`. Jitted code only.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .q8_act import QBLOCK

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32I8, _V16I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16)
_V16I32 = ir.VectorType(_I32, 16)
_PMADD = "avx512bw" in llvm_binding.get_host_cpu_features().flatten()  # vpmaddwd on 512-bit registers
PREFETCH_ROWS = 8  # software prefetch distance of the row kernels, in weight rows


@nb.njit(cache=True)
def quantize_rows(x, xq, xd, xf):
    """Per-block int8 quantization of every row b of x (B, K) float (module docstring): xq[b, :K] int8 values,
    xd[b, :blocks] scales (x's dtype), xf[b, :K] = xq * scale (the dequantized activations, x's dtype). Not
    fast-math, and every operation in x's dtype, so it rounds as the oracle does."""
    n_blocks = (x.shape[1] + QBLOCK - 1) // QBLOCK
    for b in range(x.shape[0]):
        for blk in range(n_blocks):
            k0, k1 = blk * QBLOCK, min(x.shape[1], blk * QBLOCK + QBLOCK)
            amax = x[b, k0] - x[b, k0]
            for k in range(k0, k1):
                amax = max(amax, abs(x[b, k]))
            xd[b, blk] = amax / 127  # computed in float64 and rounded once: the correctly rounded quotient
            d = xd[b, blk]
            if d > 0:
                for k in range(k0, k1):
                    q = np.round(x[b, k] / d)
                    xq[b, k] = np.int8(q)
                    xf[b, k] = q * d
            else:
                for k in range(k0, k1):
                    xq[b, k] = 0
                    xf[b, k] = d


def _data(builder, arr, offset):
    """Pointer to element ``offset`` of a C-contiguous array value (field 4 of numba's array struct: data)."""
    return builder.gep(builder.extract_value(arr, 4), [offset])


def _index(values) -> ir.Constant:
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


def _block_sum(builder, a, b):
    """<16 x i32>: pairwise sums of the 32 products of two <32 x i8> vectors (signed)."""
    v16 = ir.VectorType(_I16, 32)
    if _PMADD:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [v16, v16]),
                                            "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [builder.sext(a, v16), builder.sext(b, v16)])
    v32 = ir.VectorType(_I32, 32)
    p = builder.mul(builder.sext(a, v32), builder.sext(b, v32))
    even = builder.shuffle_vector(p, p, _index(range(0, 32, 2)))
    odd = builder.shuffle_vector(p, p, _index(range(1, 32, 2)))
    return builder.add(even, odd)


def _nibbles(builder, ptr, group):
    """The 32 weights (unsigned nibbles 0..15 as <32 x i8>) of activation sub-block ``s`` of an int4 group, for
    group 32 (16 bytes: low nibbles then high nibbles); larger groups load 32 bytes at ``ptr`` and take either
    nibble (the caller picks the pointer and which half via ``group``: 'lo' or 'hi')."""
    if group == 32:
        v = builder.load(builder.bitcast(ptr, _V16I8.as_pointer()), align=1)
        lo = builder.and_(v, ir.Constant(_V16I8, [15] * 16))
        hi = builder.lshr(v, ir.Constant(_V16I8, [4] * 16))
        return builder.shuffle_vector(lo, hi, _index(range(32)))
    v = builder.load(builder.bitcast(ptr, _V32I8.as_pointer()), align=1)
    if group == "lo":
        return builder.and_(v, ir.Constant(_V32I8, [15] * 32))
    return builder.lshr(v, ir.Constant(_V32I8, [4] * 32))


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _reduce(builder, vec, ty):
    name = f"llvm.vector.reduce.fadd.v16{'f32' if ty == ir.FloatType() else 'f64'}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, vec.type]), name)
    return builder.call(fn, [ir.Constant(ty, -0.0), vec], fastmath=("fast",))


def _prefetch(builder, ptr) -> None:
    """A read prefetch of ``ptr`` into all cache levels (``prefetcht0``)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
        ir.PointerType(_I8), _I32, _I32, _I32]), "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, ir.PointerType(_I8)), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                      ir.Constant(_I32, 1)])


def _rows_intrinsic(n_rows: int, group: int, prefetch_rows: int = PREFETCH_ROWS):
    """An intrinsic ``f(xq, xoff, xd, xdoff, w, woff, stride, n_blocks, ws, wsoff) -> n_rows-tuple`` of
    sum over full activation blocks i < n_blocks of xd[xdoff + i] * (int32 block product of xq[xoff + 32 i:] and
    weight row r), rows r at w[woff + r * stride:]. group 0: int8 weights (ws unused); group 32/64/128: packed
    int4 (stride in bytes), each block also scaled by its group's ws[wsoff + r * stride_groups + g].
    ``prefetch_rows``: each block also prefetches the same columns of the rows that many rows further (0: none),
    so the next rows stream in while these multiply (the hardware prefetcher alone falls behind)."""

    @intrinsic
    def rows(typingctx, xq, xoff, xd, xdoff, w, woff, stride, n_blocks, ws, wsoff):
        ret = types.UniTuple(xd.dtype, n_rows)
        sig = ret(xq, types.intp, xd, types.intp, w, types.intp, types.intp, types.intp, ws, types.intp)

        def codegen(context, builder, sg, args):
            axq, axoff, axd, axdoff, aw, awoff, astride, anb, aws, awsoff = args
            fty = context.get_value_type(sg.args[2].dtype)
            vty = ir.VectorType(fty, 16)
            zero = ir.Constant(vty, [0.0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_rows)]
            with cgutils.for_range(builder, anb) as loop:
                i = loop.index
                k = builder.mul(i, ir.Constant(i.type, QBLOCK))
                xv = builder.load(builder.bitcast(_data(builder, axq, builder.add(axoff, k)), _V32I8.as_pointer()),
                                  align=1)
                d = builder.load(_data(builder, axd, builder.add(axdoff, i)))
                for r in range(n_rows):
                    row = builder.add(awoff, builder.mul(astride, ir.Constant(i.type, r)))
                    if prefetch_rows:
                        ahead = builder.add(row, builder.mul(astride, ir.Constant(i.type, prefetch_rows)))
                        col = k if group == 0 else builder.udiv(k, ir.Constant(i.type, 2))
                        _prefetch(builder, _data(builder, aw, builder.add(ahead, col)))
                    scale = d
                    if group == 0:
                        wv = builder.load(builder.bitcast(_data(builder, aw, builder.add(row, k)),
                                                          _V32I8.as_pointer()), align=1)
                    else:
                        per = group // QBLOCK  # activation blocks per group
                        g = builder.udiv(i, ir.Constant(i.type, per))
                        s = builder.urem(i, ir.Constant(i.type, per))
                        gbytes = builder.add(row, builder.mul(g, ir.Constant(i.type, group // 2)))
                        if group == QBLOCK:
                            nib = _nibbles(builder, _data(builder, aw, gbytes), 32)
                        else:  # sub-blocks [0, per / 2) are low nibbles of 32-byte runs, the rest high nibbles
                            half = ir.Constant(i.type, per // 2)
                            is_hi = builder.icmp_unsigned(">=", s, half)
                            run = builder.select(is_hi, builder.sub(s, half), s)
                            ptr = _data(builder, aw, builder.add(gbytes, builder.mul(run, ir.Constant(i.type, 32))))
                            nib = builder.select(is_hi, _nibbles(builder, ptr, "hi"), _nibbles(builder, ptr, "lo"))
                        wv = builder.sub(nib, ir.Constant(_V32I8, [8] * 32))
                        n_groups = builder.udiv(builder.mul(astride, ir.Constant(i.type, 2)),
                                                ir.Constant(i.type, group))
                        gs = builder.load(_data(builder, aws, builder.add(
                            builder.add(awsoff, builder.mul(n_groups, ir.Constant(i.type, r))), g)))
                        if gs.type != fty:
                            gs = builder.fpext(gs, fty)
                        scale = builder.fmul(d, gs)
                    p = builder.sitofp(_block_sum(builder, xv, wv), vty)
                    acc = builder.load(accs[r])
                    builder.store(builder.fadd(acc, builder.fmul(p, _splat(builder, scale, vty), flags=("fast",)),
                                               flags=("fast",)), accs[r])
            out = [_reduce(builder, builder.load(a), fty) for a in accs]
            return context.make_tuple(builder, sg.return_type, out)

        return sig, codegen

    return rows


_i8_rows4 = _rows_intrinsic(4, 0)
_i8_rows1 = _rows_intrinsic(1, 0)
_i4_rows4_g32 = _rows_intrinsic(4, 32)
_i4_rows4_g64 = _rows_intrinsic(4, 64)
_i4_rows4_g128 = _rows_intrinsic(4, 128)
_i4_rows1_g32 = _rows_intrinsic(1, 32)
_i4_rows1_g64 = _rows_intrinsic(1, 64)
_i4_rows1_g128 = _rows_intrinsic(1, 128)


@nb.njit(inline="always", fastmath=True, cache=True)
def _i8_tail(xq, xd, b, w, o, k):
    """The last, partial activation block's term of row o (0 when K is a multiple of QBLOCK)."""
    k0 = (k // QBLOCK) * QBLOCK
    s = 0
    for j in range(k0, k):
        s += np.int32(xq[b, j]) * np.int32(w[o, j])
    return xd[b, k // QBLOCK] * s if k0 < k else xd[b, 0] * 0


@nb.njit(inline="always", fastmath=True, cache=True)
def rows_int8(xq, xd, w, lo, hi, scale, bias, buf):
    """buf[o - lo, b] = (x[b] . int8 row o, activations quantized) * scale[o] + bias[o] for o in [lo, hi);
    xq (B', >= K) / xd: from :func:`quantize_rows` (B = buf.shape[1] rows used), w (O, K) int8, scale (O,),
    bias (O,) or length 0."""
    k = w.shape[1]
    nfull = k // QBLOCK
    for b in range(buf.shape[1]):
        xo, do = b * xq.shape[1], b * xd.shape[1]
        o = lo
        while o + 4 <= hi:
            a0, a1, a2, a3 = _i8_rows4(xq, xo, xd, do, w, o * k, k, nfull, xd, 0)
            buf[o - lo, b] = (a0 + _i8_tail(xq, xd, b, w, o, k)) * scale[o]
            buf[o + 1 - lo, b] = (a1 + _i8_tail(xq, xd, b, w, o + 1, k)) * scale[o + 1]
            buf[o + 2 - lo, b] = (a2 + _i8_tail(xq, xd, b, w, o + 2, k)) * scale[o + 2]
            buf[o + 3 - lo, b] = (a3 + _i8_tail(xq, xd, b, w, o + 3, k)) * scale[o + 3]
            o += 4
        while o < hi:
            (a0,) = _i8_rows1(xq, xo, xd, do, w, o * k, k, nfull, xd, 0)
            buf[o - lo, b] = (a0 + _i8_tail(xq, xd, b, w, o, k)) * scale[o]
            o += 1
        if bias.shape[0] > 0:
            for o in range(lo, hi):
                buf[o - lo, b] += bias[o]


@nb.njit(inline="always", fastmath=True, cache=True)
def rows_int4(xq, xd, w, lo, hi, scale, bias, buf):
    """:func:`rows_int8` for packed int4 weights w (O, K / 2) with group scales scale (O, K / group), group 32,
    64 or 128 (the caller checks: :func:`int4_group_ok`)."""
    nbytes = w.shape[1]
    group = 2 * nbytes // scale.shape[1]
    nfull = 2 * nbytes // QBLOCK
    ng = scale.shape[1]
    for b in range(buf.shape[1]):
        xo, do = b * xq.shape[1], b * xd.shape[1]
        o = lo
        while o + 4 <= hi:
            if group == 32:
                a = _i4_rows4_g32(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            elif group == 64:
                a = _i4_rows4_g64(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            else:
                a = _i4_rows4_g128(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            buf[o - lo, b], buf[o + 1 - lo, b], buf[o + 2 - lo, b], buf[o + 3 - lo, b] = a
            o += 4
        while o < hi:
            if group == 32:
                (a0,) = _i4_rows1_g32(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            elif group == 64:
                (a0,) = _i4_rows1_g64(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            else:
                (a0,) = _i4_rows1_g128(xq, xo, xd, do, w, o * nbytes, nbytes, nfull, scale, o * ng)
            buf[o - lo, b] = a0
            o += 1
        if bias.shape[0] > 0:
            for o in range(lo, hi):
                buf[o - lo, b] += bias[o]


@nb.njit(inline="always", cache=True)
def int4_group_ok(w, scale):
    """Whether :func:`rows_int4` takes this packed weight: groups of 32, 64 or 128 inputs."""
    group = 2 * w.shape[1] // scale.shape[1]
    return group == 32 or group == 64 or group == 128

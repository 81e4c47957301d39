"""Integer-activation row products for the decode kernels (llama.cpp's q8_0 x q8_0 and q4_0 x q8_0 route).

The activation row x (K,) is quantized per block of :data:`QBLOCK` inputs (a shorter last block when K is not a
multiple): ``d = max|x_block| / 127`` (0 for an all-zero block), ``q = round_half_even(x / d)`` in [-127, 127]
(:func:`quantize_rows`). A weight row then multiplies integers: the int8 x int8 (here) or int4 x int8
(:mod:`._numba_q4`) products are summed exactly in int32 per 4 neighbours (16 lanes per 64 inputs), and each
lane's sum is converted to float and scaled by its block's ``d`` (:func:`pack_acts8` lays the scales out per
lane, ``xv``). With AVX-512 VNNI, ``vpdpbusd`` (unsigned x signed bytes) takes the weight shifted to unsigned,
w + 128, and the lane's sum starts from ``xc`` = -128 x (the sum of its four activations), which makes it exact;
with AVX-512BW, ``vpmaddwd`` on the sign-extended bytes and a pairwise add; elsewhere plain widening multiplies
(LLVM lowers them for any target). A last partial step (K not a multiple of 64) is summed per element.
:data:`ISA` is the widest set the compile target allows (the host, or NUMBA_CPU_FEATURES); :func:`make_rows_int8`
builds the row function for any of :data:`ISAS` (tests force each fallback, and VNNI's offsets emulated).
Oracle: :func:`ssmkit.ops.reference.q8_linear` (the same activation quantization, then a float64
product with the dequantized weight).

Row kernels take x's quantized form (``xq`` (B, K) int8, ``xd`` (B, blocks) scales in x's dtype, and the lane
layout), the weight and its scale, and write ``buf[o - lo, b]`` like
:func:`ssmkit.ops._numba_decode._rows_block`. Jitted code only.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .q8_act import QBLOCK

#: the instruction sets of the row functions; "vnni-emulated" is VNNI's arithmetic (unsigned weights, the
#: per-lane offset) in generic operations, so tests check that path on any CPU
ISAS = ("vnni", "avx512bw", "generic", "vnni-emulated")


def target_features(spec: str | None = None) -> dict[str, bool]:
    """The CPU features numba compiles for, feature -> enabled: ``spec`` ("+avx2,-avx512f,..."), by default
    NUMBA_CPU_FEATURES when set, else the host's as numba reads them (NUMBA_ENABLE_AVX=0 turns the avx ones off).
    A feature not in the list counts as absent."""
    if spec is None:
        from numba.core.codegen import get_host_cpu_features

        spec = nb.config.CPU_FEATURES if nb.config.CPU_FEATURES is not None else get_host_cpu_features()
    return {f[1:]: f[0] == "+" for f in spec.split(",") if f[:1] in ("+", "-")}


def isa_for(features: dict[str, bool]) -> str:
    """The widest instruction set of :data:`ISAS` that ``features`` (:func:`target_features`) allow."""
    if features.get("avx512bw"):
        return "vnni" if features.get("avx512vnni") else "avx512bw"
    return "generic"


#: the instruction set the decode kernels' integer products use: the features numba compiles for, which are the
#: host's unless NUMBA_CPU_FEATURES names others (a cache built for a portable target must not hold VNNI code)
ISA = isa_for(target_features())
PREFETCH_ROWS = 8  # software prefetch distance of the row kernels, in weight rows
STEP = 64  # activations per row step: 16 int32 lanes of 4 products

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16I8, _V32I8, _V64I8 = (ir.VectorType(_I8, n) for n in (16, 32, 64))
_V16I32 = ir.VectorType(_I32, 16)


#: fast-math flags of :func:`quantize_rows`: enough to vectorise the block maxima (a maximum is exact in any order);
#: no flag touches the division or the rounding
_MAX_FLAGS = {"nnan", "ninf", "nsz", "reassoc"}


@nb.njit(inline="always", fastmath=_MAX_FLAGS, cache=True)
def _quantize_block(x, xq, xd, xf, b, blk, k0, k1):
    """Block blk = inputs [k0, k1) of row b (see :func:`quantize_rows`)."""
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


@nb.njit(fastmath=_MAX_FLAGS, cache=True)
def quantize_rows(x, xq, xd, xf):
    """Per-block int8 quantization of every row b of x (B, K) float (module docstring): xq[b, :K] int8 values,
    xd[b, :blocks] scales (x's dtype), xf[b, :K] = xq * scale (the dequantized activations, x's dtype). Every
    operation in x's dtype, the division and the rounding IEEE (fast-math only for the block maxima), so it
    rounds as the oracle does. Full blocks run as loops of constant length QBLOCK (vectorised: 3x faster)."""
    n_full = x.shape[1] // QBLOCK
    for b in range(x.shape[0]):
        for blk in range(n_full):  # the same as _quantize_block, in loops of constant length
            k0 = blk * QBLOCK
            amax = x[b, k0] - x[b, k0]
            for j in range(QBLOCK):
                amax = max(amax, abs(x[b, k0 + j]))
            xd[b, blk] = amax / 127
            d = xd[b, blk]
            if d > 0:
                for j in range(QBLOCK):
                    q = np.round(x[b, k0 + j] / d)
                    xq[b, k0 + j] = np.int8(q)
                    xf[b, k0 + j] = q * d
            else:
                for j in range(QBLOCK):
                    xq[b, k0 + j] = 0
                    xf[b, k0 + j] = d
        if x.shape[1] > n_full * QBLOCK:
            _quantize_block(x, xq, xd, xf, b, n_full, n_full * QBLOCK, x.shape[1])


@nb.njit(cache=True)
def pack_acts8(xq, xd, xc, xv):
    """The int8 products' lane layout of every row b of xq (B, K) (module docstring): xc[b, 16 s + l] =
    -128 x (sum of xq[b, 64 s + 4 l:][:4]) and xv[b, 16 s + l] = its block's scale xd[b, (64 s + 4 l) // 32],
    for the full steps s < K // 64."""
    for b in range(xq.shape[0]):
        for s in range(xq.shape[1] // STEP):
            for lane in range(16):
                k = STEP * s + 4 * lane
                total = np.int32(xq[b, k]) + np.int32(xq[b, k + 1]) + np.int32(xq[b, k + 2]) + np.int32(xq[b, k + 3])
                xc[b, 16 * s + lane] = -128 * total
                xv[b, 16 * s + lane] = xd[b, k // QBLOCK]


def data_ptr(builder, arr, offset):
    """Pointer to element ``offset`` of a C-contiguous array value (field 4 of numba's array struct: data)."""
    return builder.gep(builder.extract_value(arr, 4), [offset])


def load(builder, arr, offset, vty):
    """An unaligned vector load of ``vty`` at element ``offset`` of a C-contiguous array value."""
    return builder.load(builder.bitcast(data_ptr(builder, arr, offset), vty.as_pointer()), align=1)


def const(values, ty=_I32) -> ir.Constant:
    """A constant vector (e.g. a shuffle mask)."""
    values = list(values)
    return ir.Constant(ir.VectorType(ty, len(values)), values)


def call(builder, name, ret, args, fastmath=()):
    """A call of the LLVM intrinsic ``name``."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=fastmath)


def prefetch(builder, ptr) -> None:
    """A read prefetch of ``ptr`` into all cache levels (``prefetcht0``)."""
    call(builder, "llvm.prefetch.p0", ir.VoidType(), [builder.bitcast(ptr, ir.PointerType(_I8)),
                                                      ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def reduce_sum(builder, vec):
    """The sum of a float vector's lanes (any order)."""
    ty = vec.type.element
    name = f"llvm.vector.reduce.fadd.v{vec.type.count}{'f32' if ty == ir.FloatType() else 'f64'}"
    return call(builder, name, ty, [ir.Constant(ty, -0.0), vec], ("fast",))


def sum4(builder, p):
    """<16 x i32>: the sums of each 4 neighbours of a <64 x i32>."""
    out = builder.shuffle_vector(p, p, const(range(0, 64, 4)))
    for i in range(1, 4):
        out = builder.add(out, builder.shuffle_vector(p, p, const(range(i, 64, 4))))
    return out


def _dot4_s8(builder, xc, w, x, isa):
    """<16 x i32>: the sums of each 4 neighbouring products of w and x (<64 x i8>, both signed); with VNNI from
    ``xc`` = -128 x the sums of x's four (``vpdpbusd`` of w + 128), otherwise from 0 (xc unused)."""
    if isa in ("vnni", "vnni-emulated"):
        u = builder.xor(w, ir.Constant(_V64I8, [-128] * 64))
        if isa == "vnni-emulated":  # vpdpbusd's arithmetic: unsigned u times signed x, 4 per lane, added to xc
            v64 = ir.VectorType(_I32, 64)
            return builder.add(xc, sum4(builder, builder.mul(builder.zext(u, v64), builder.sext(x, v64))))
        return call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                    [xc, builder.bitcast(u, _V16I32), builder.bitcast(x, _V16I32)])
    if isa == "avx512bw":
        v32i16 = ir.VectorType(_I16, 32)
        halves = []
        for h in range(2):
            idx = const(range(32 * h, 32 * h + 32))
            a = builder.sext(builder.shuffle_vector(w, w, idx), v32i16)
            b = builder.sext(builder.shuffle_vector(x, x, idx), v32i16)
            halves.append(call(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [a, b]))
        both = builder.shuffle_vector(halves[0], halves[1], const(range(32)))  # pair sums
        return builder.add(builder.shuffle_vector(both, both, const(range(0, 32, 2))),
                           builder.shuffle_vector(both, both, const(range(1, 32, 2))))
    v64 = ir.VectorType(_I32, 64)
    return sum4(builder, builder.mul(builder.sext(w, v64), builder.sext(x, v64)))


def _rows_intrinsic(n_rows: int, isa: str, prefetch_rows: int = PREFETCH_ROWS):
    """An intrinsic ``f(xq, xoff, xc, xv, loff, w, woff, k, n_steps) -> n_rows-tuple``: for int8 rows r at
    w[woff + r k:], the sum over steps s < n_steps of float(int32 lane sums of xq[xoff + 64 s:] and the row)
    x xv[loff + 16 s:] (:func:`pack_acts8`). ``prefetch_rows``: each step also prefetches the same columns of the
    row that many rows further (0: none), so the next rows stream in while these multiply."""

    @intrinsic
    def rows(typingctx, xq, xoff, xc, xv, loff, w, woff, k, n_steps):
        ret = types.UniTuple(xv.dtype, n_rows)
        sig = ret(xq, types.intp, xc, xv, types.intp, w, types.intp, types.intp, types.intp)

        def codegen(context, builder, sg, args):
            axq, axoff, axc, axv, aloff, aw, awoff, ak, ansteps = args
            fty = context.get_value_type(sg.args[3].dtype)
            vty = ir.VectorType(fty, 16)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * 16)) for _ in range(n_rows)]
            with cgutils.for_range(builder, ansteps) as loop:
                s = loop.index
                col = builder.mul(s, ir.Constant(s.type, STEP))
                lane = builder.add(aloff, builder.mul(s, ir.Constant(s.type, 16)))
                xv8 = load(builder, axq, builder.add(axoff, col), _V64I8)
                xcv = load(builder, axc, lane, _V16I32)
                xvv = load(builder, axv, lane, vty)
                for r in range(n_rows):
                    row = builder.add(awoff, builder.mul(ak, ir.Constant(s.type, r)))
                    if prefetch_rows:
                        ahead = builder.add(row, builder.mul(ak, ir.Constant(s.type, prefetch_rows)))
                        prefetch(builder, data_ptr(builder, aw, builder.add(ahead, col)))
                    wv = load(builder, aw, builder.add(row, col), _V64I8)
                    p = builder.fmul(builder.sitofp(_dot4_s8(builder, xcv, wv, xv8, isa), vty), xvv, flags=("fast",))
                    builder.store(builder.fadd(builder.load(accs[r]), p, flags=("fast",)), accs[r])
            out = [reduce_sum(builder, builder.load(a)) for a in accs]
            return context.make_tuple(builder, sg.return_type, out)

        return sig, codegen

    return rows


@nb.njit(inline="always", fastmath=True, cache=True)
def _i8_tail(xq, xd, b, w, o, k):
    """Row o's terms of the inputs past the last full step of 64 (0 when K is a multiple of 64)."""
    acc = xd[b, 0] * 0
    for k0 in range((k // STEP) * STEP, k, QBLOCK):
        s = 0
        for j in range(k0, min(k, k0 + QBLOCK)):
            s += np.int32(xq[b, j]) * np.int32(w[o, j])
        acc += xd[b, k0 // QBLOCK] * s
    return acc


def make_rows_int8(isa: str = ISA):
    """The jitted ``rows_int8(xq, xd, xc, xv, w, lo, hi, scale, bias, buf)`` for instruction set ``isa`` (one of
    :data:`ISAS`): buf[o - lo, b] = (x[b] . int8 row o, activations quantized) * scale[o] + bias[o] for
    o in [lo, hi); xq (B', K) / xd from :func:`quantize_rows`, xc / xv from :func:`pack_acts8` (B =
    buf.shape[1] rows used), w (O, K) int8, scale (O,), bias (O,) or length 0."""
    if isa not in ISAS:
        raise ValueError(f"make_rows_int8: isa must be one of {ISAS}, got {isa!r}")
    r4, r1 = _rows_intrinsic(4, isa), _rows_intrinsic(1, isa)

    @nb.njit(inline="always", fastmath=True)
    def rows_int8(xq, xd, xc, xv, w, lo, hi, scale, bias, buf):
        k = w.shape[1]
        n_steps = k // STEP
        for b in range(buf.shape[1]):
            xo, lo_ = b * xq.shape[1], b * xc.shape[1]
            o = lo
            while o + 4 <= hi:
                a0, a1, a2, a3 = r4(xq, xo, xc, xv, lo_, w, o * k, k, n_steps)
                buf[o - lo, b] = (a0 + _i8_tail(xq, xd, b, w, o, k)) * scale[o]
                buf[o + 1 - lo, b] = (a1 + _i8_tail(xq, xd, b, w, o + 1, k)) * scale[o + 1]
                buf[o + 2 - lo, b] = (a2 + _i8_tail(xq, xd, b, w, o + 2, k)) * scale[o + 2]
                buf[o + 3 - lo, b] = (a3 + _i8_tail(xq, xd, b, w, o + 3, k)) * scale[o + 3]
                o += 4
            while o < hi:
                (a0,) = r1(xq, xo, xc, xv, lo_, w, o * k, k, n_steps)
                buf[o - lo, b] = (a0 + _i8_tail(xq, xd, b, w, o, k)) * scale[o]
                o += 1
            if bias.shape[0] > 0:
                for o in range(lo, hi):
                    buf[o - lo, b] += bias[o]

    return rows_int8


#: the host's row function (:data:`ISA`)
rows_int8 = make_rows_int8(ISA)

"""int4 x int8 row products for the decode kernels with ``vpdpbusd`` (AVX-512 VNNI), and their fallbacks.

The weight (O, K / 2) holds nibbles q + 8 (0..15, :mod:`ssmkit.ops.int4_linear`); the activations are int8 per
block of 32 (:func:`ssmkit.ops._numba_q8.quantize_rows`). ``vpdpbusd`` multiplies unsigned bytes by signed bytes
and adds each 4 neighbouring products into an int32 lane, so the nibbles enter unsigned, as stored, and the
offset is corrected exactly: sum (q + 8 - 8) x = dot(nibbles, x) - 8 sum x, where the second term depends on the
activations only. Per token, :func:`pack_acts` lays the activations out in the order of the weight's bytes:

- step s covers weight bytes [32 s, 32 s + 32) of a row: their low nibbles are lanes 0-7 (4 bytes a lane) and
  their high nibbles lanes 8-15 of one 64-byte vector; ``xp[64 s:64 s + 64]`` holds the matching activations;
- ``xc[16 s + l]`` = -8 x (the sum of lane l's four activations) for the low lanes l < 8, -128 x that sum for the
  high lanes: the starting value of lane l's int32 sum;
- ``xv[16 s + l]`` = the scale of lane l's activation block, divided by 16 for the high lanes (0 for padding
  past K).

A row step is then: load 32 bytes into both halves of a 64-byte vector, mask the low nibbles in the first half
and the high nibbles in place (16 (q + 8)) in the second, one ``vpdpbusd`` onto ``xc`` (the high lanes' sums are
16 x theirs, exactly, hence -128 and / 16), convert the 16 exact int32 sums to float and add them times ``xv`` x
the lane's weight-group scale: no nibble shift. Without VNNI: ``vpmaddubsw`` then
``vpmaddwd`` by ones (AVX-512BW; no saturation: |pair| <= 2 x 15 x 127), or plain widening multiplies (any
target; "vnni-emulated" is this one: the offsets are the same on every set). :data:`ISA` is the compile target's
(:mod:`._numba_q8`); :func:`make_rows_int4` builds the row function for any of :data:`ISAS` (tests force each
fallback). Oracle: :func:`ssmkit.ops.reference.q8_linear`. Jitted code only.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_q8 import ISA, ISAS, PREFETCH_ROWS, STEP, call, const, data_ptr, load, prefetch, reduce_sum, sum4
from .q8_act import QBLOCK

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16I8, _V32I8, _V64I8 = (ir.VectorType(_I8, n) for n in (16, 32, 64))
_V16I32 = ir.VectorType(_I32, 16)


@nb.njit(cache=True)
def pack_acts(xq, xd, group, xp, xc, xv):
    """The per-token layout of the module docstring for every row b of xq (B, K) int8 with block scales xd, for
    weights of ``group`` inputs per scale (32, 64 or 128): xp (B, >= 64 S) int8, xc (B, >= 16 S) int32,
    xv (B, >= 16 S) xd's dtype, S = ceil(K / 64) steps; padding past K gets zeros. No division in the loops
    (this runs for every stage of every token)."""
    nbytes = xq.shape[1] // 2
    half = group // 2
    n_steps = (nbytes + 31) // 32
    for b in range(xq.shape[0]):
        for i in range(STEP * (n_steps - 1), STEP * n_steps):  # a half last step: zeros past K
            xp[b, i] = 0
        for i in range(16 * (n_steps - 1), 16 * n_steps):
            xv[b, i] = xd[b, 0] * 0
        byte = 0
        for g0 in range(0, xq.shape[1], group):  # group g0 // group: bytes [g0 / 2, g0 / 2 + half)
            for p in range(half):
                s, j = byte >> 5, byte & 31
                lo, hi = g0 + p, g0 + half + p
                xp[b, STEP * s + j], xp[b, STEP * s + 32 + j] = xq[b, lo], xq[b, hi]
                if j & 3 == 0:  # a lane's first byte: its activation blocks (high lanes: / 16, exact)
                    xv[b, 16 * s + (j >> 2)] = xd[b, lo // QBLOCK]
                    xv[b, 16 * s + 8 + (j >> 2)] = xd[b, hi // QBLOCK] / 16
                byte += 1
        for i in range(16 * n_steps):
            o = 4 * i
            total = np.int32(xp[b, o]) + np.int32(xp[b, o + 1]) + np.int32(xp[b, o + 2]) + np.int32(xp[b, o + 3])
            xc[b, i] = (-8 if i & 15 < 8 else -128) * total


def _dot4(builder, acc, u, s, isa):
    """acc <16 x i32> + the sums of each 4 neighbouring products of u <64 x i8> (unsigned, < 16) and s
    <64 x i8> (signed)."""
    if isa == "vnni":
        return call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                     [acc, builder.bitcast(u, _V16I32), builder.bitcast(s, _V16I32)])
    if isa == "avx512bw":
        pairs = call(builder, "llvm.x86.avx512.pmaddubs.w.512", ir.VectorType(_I16, 32), [u, s])
        ones = ir.Constant(ir.VectorType(_I16, 32), [1] * 32)
        return builder.add(acc, call(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [pairs, ones]))
    v64 = ir.VectorType(_I32, 64)
    return builder.add(acc, sum4(builder, builder.mul(builder.zext(u, v64), builder.sext(s, v64))))


def _nibble_dot(builder, xc, v, xp, isa):
    """<16 x i32>: xc + the lane sums of the 32 bytes v's nibbles times the activations xp <64 x i8>. The bytes are
    doubled into one 64-byte vector and masked: low nibbles (0-15) in lanes 0-7, high nibbles in place (16 q,
    0-240) in lanes 8-15, whose sums :func:`pack_acts` offsets by -128 x and scales by 1 / 16 (exact), so there is
    no shift. ``vpmaddubsw`` would saturate on 240 x 127 pairs: AVX-512BW shifts the nibbles down and the high
    lanes' sums up by 4 bits instead."""
    if isa == "avx512bw":
        lo = builder.and_(v, ir.Constant(_V32I8, [15] * 32))
        hi = builder.lshr(v, ir.Constant(_V32I8, [4] * 32))
        d = _dot4(builder, ir.Constant(_V16I32, [0] * 16), builder.shuffle_vector(lo, hi, const(range(64))), xp, isa)
        return builder.add(xc, builder.shl(d, ir.Constant(_V16I32, [0] * 8 + [4] * 8)))
    both = builder.shuffle_vector(v, v, const(list(range(32)) * 2))
    return _dot4(builder, xc, builder.and_(both, ir.Constant(_V64I8, [15] * 32 + [-16] * 32)), xp, isa)


def _rows_intrinsic(n_rows: int, group: int, isa: str, prefetch_rows: int = PREFETCH_ROWS):
    """An intrinsic ``f(xp, xc, xv, xoff, w, woff, nbytes, ws, wsoff, ng) -> n_rows-tuple``: for rows r at
    w[woff + r nbytes:] (nbytes bytes each, int4 of ``group``), the sum over steps of float(int32 lane sums)
    x xv x the lane's group scale ws[wsoff + r ng + g]; xp / xc / xv from :func:`pack_acts` at step offset
    xoff (xp at 64 xoff, xc / xv at 16 xoff). A last half step (16 bytes) loads only its bytes."""

    @intrinsic
    def rows(typingctx, xp, xc, xv, xoff, w, woff, nbytes, ws, wsoff, ng):
        ret = types.UniTuple(xv.dtype, n_rows)
        sig = ret(xp, xc, xv, types.intp, w, types.intp, types.intp, ws, types.intp, types.intp)

        def codegen(context, builder, sg, args):
            axp, axc, axv, axoff, aw, awoff, anbytes, aws, awsoff, ang = args
            ity = axoff.type
            fty = context.get_value_type(sg.args[2].dtype)
            vty = ir.VectorType(fty, 16)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * 16)) for _ in range(n_rows)]

            def c(v):
                return ir.Constant(ity, v)

            def step(s, half_step):
                xs = builder.add(axoff, s)
                xpv = load(builder, axp, builder.mul(xs, c(STEP)), _V64I8)
                xcv = load(builder, axc, builder.mul(xs, c(16)), _V16I32)
                xvv = load(builder, axv, builder.mul(xs, c(16)), vty)
                col = builder.mul(s, c(32))
                for r in range(n_rows):
                    row = builder.add(awoff, builder.mul(anbytes, c(r)))
                    if prefetch_rows and not half_step:
                        ahead = builder.add(row, builder.mul(anbytes, c(prefetch_rows)))
                        prefetch(builder, data_ptr(builder, aw, builder.add(ahead, col)))
                    ptr = data_ptr(builder, aw, builder.add(row, col))
                    if half_step:
                        v16 = builder.load(builder.bitcast(ptr, _V16I8.as_pointer()), align=1)
                        v = builder.shuffle_vector(v16, ir.Constant(_V16I8, [0] * 16), const(range(32)))
                    else:
                        v = builder.load(builder.bitcast(ptr, _V32I8.as_pointer()), align=1)
                    idot = _nibble_dot(builder, xcv, v, xpv, isa)
                    srow = builder.add(awsoff, builder.mul(ang, c(r)))
                    wty = context.get_value_type(sg.args[7].dtype)
                    if group == 32 and not half_step:  # groups 2s (lanes 0-3, 8-11) and 2s + 1
                        pair = load(builder, aws, builder.add(srow, builder.mul(s, c(2))), ir.VectorType(wty, 2))
                        wsv = builder.shuffle_vector(pair, pair, const([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4))
                    else:
                        g = builder.udiv(builder.mul(s, c(32)), c(group // 2))
                        one = builder.load(data_ptr(builder, aws, builder.add(srow, g)))
                        v1 = ir.VectorType(wty, 1)
                        one = builder.insert_element(ir.Constant(v1, ir.Undefined), one, ir.Constant(_I32, 0))
                        wsv = builder.shuffle_vector(one, one, const([0] * 16))
                    if wty != fty:
                        wsv = builder.fpext(wsv, vty) if wty == ir.FloatType() else builder.fptrunc(wsv, vty)
                    scale = builder.fmul(xvv, wsv, flags=("fast",))
                    p = builder.fmul(builder.sitofp(idot, vty), scale, flags=("fast",))
                    builder.store(builder.fadd(builder.load(accs[r]), p, flags=("fast",)), accs[r])

            n_full = builder.udiv(anbytes, c(32))
            with cgutils.for_range(builder, n_full) as loop:
                step(loop.index, False)
            has_half = builder.icmp_unsigned("!=", builder.urem(anbytes, c(32)), c(0))
            with builder.if_then(has_half, likely=False):
                step(n_full, True)
            out = [reduce_sum(builder, builder.load(a)) for a in accs]
            return context.make_tuple(builder, sg.return_type, out)

        return sig, codegen

    return rows


def make_rows_int4(isa: str = ISA):
    """The jitted ``rows_int4(xp, xc, xv, w, lo, hi, scale, bias, buf)`` for instruction set ``isa`` (one of
    :data:`ISAS`): buf[o - lo, b] = (x[b] . int4 row o, activations quantized) + bias[o] for o in [lo, hi);
    xp / xc / xv from :func:`pack_acts` for w's group (B = buf.shape[1] rows used), w (O, K / 2) packed int4,
    scale (O, K / group) with group 32, 64 or 128, bias (O,) or length 0."""
    if isa not in ISAS:
        raise ValueError(f"make_rows_int4: isa must be one of {ISAS}, got {isa!r}")
    r4 = {g: _rows_intrinsic(4, g, isa) for g in (32, 64, 128)}
    r1 = {g: _rows_intrinsic(1, g, isa) for g in (32, 64, 128)}
    r4_32, r4_64, r4_128, r1_32, r1_64, r1_128 = r4[32], r4[64], r4[128], r1[32], r1[64], r1[128]

    @nb.njit(inline="always", fastmath=True)
    def rows_int4(xp, xc, xv, w, lo, hi, scale, bias, buf):
        nbytes = w.shape[1]
        ng = scale.shape[1]
        group = 2 * nbytes // ng
        steps = xc.shape[1] // 16
        for b in range(buf.shape[1]):
            xoff = b * steps
            o = lo
            while o + 4 <= hi:
                if group == 32:
                    a = r4_32(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                elif group == 64:
                    a = r4_64(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                else:
                    a = r4_128(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                buf[o - lo, b], buf[o + 1 - lo, b], buf[o + 2 - lo, b], buf[o + 3 - lo, b] = a
                o += 4
            while o < hi:
                if group == 32:
                    (a0,) = r1_32(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                elif group == 64:
                    (a0,) = r1_64(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                else:
                    (a0,) = r1_128(xp, xc, xv, xoff, w, o * nbytes, nbytes, scale, o * ng, ng)
                buf[o - lo, b] = a0
                o += 1
            if bias.shape[0] > 0:
                for o in range(lo, hi):
                    buf[o - lo, b] += bias[o]

    return rows_int4


#: the host's row function (:data:`ISA`)
rows_int4 = make_rows_int4(ISA)


@nb.njit(inline="always", cache=True)
def int4_group_ok(w, scale):
    """Whether :func:`rows_int4` takes this packed weight: groups of 32, 64 or 128 inputs."""
    group = 2 * w.shape[1] // scale.shape[1]
    return group == 32 or group == 64 or group == 128

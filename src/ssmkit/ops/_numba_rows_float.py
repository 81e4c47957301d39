"""Float weight rows for the decode kernels at batch 1-3: four rows at a time with 64-byte loads and a software
prefetch of the rows after them.

A decode step streams every weight row once. Four rows read together are four streams, which one core reads
about twice as fast as one; the hardware prefetcher still stops at each 4 KiB page of every stream, so each step
also prefetches the same columns :data:`PREFETCH_ROWS` rows further on (the next block's rows), which keeps the
next lines in flight across page boundaries. :func:`rows4` is the intrinsic; :func:`rows_block_float` is
:func:`ssmkit.ops._numba_rows._rows_block` for C-contiguous float weights of x's dtype. Jitted code only.
"""

from __future__ import annotations

import numba as nb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_q8 import data_ptr, load, prefetch, reduce_sum

PREFETCH_ROWS = 4  # software prefetch distance in weight rows (1.1-1.2x over none on the 130M Mamba shapes)


@intrinsic
def rows4(typingctx, x, xoff, w, woff, k):
    """(x[xoff:xoff + m] . w[woff + r k:][:m] for r < 4), m = k rounded down to the vector width (16 float32 or
    8 float64): four rows of k items, x and w 1-D (or C-contiguous, flat offsets) of one float dtype."""
    if not (isinstance(x, types.Array) and isinstance(w, types.Array) and x.dtype == w.dtype
            and isinstance(x.dtype, types.Float)):
        return None
    sig = types.UniTuple(x.dtype, 4)(x, types.intp, w, types.intp, types.intp)

    def codegen(context, builder, sg, args):
        ax, axoff, aw, awoff, ak = args
        fty = context.get_value_type(sg.args[0].dtype)
        width = 64 // context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, width)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * width)) for _ in range(4)]

        def c(v):
            return ir.Constant(ak.type, v)

        with cgutils.for_range(builder, builder.udiv(ak, c(width))) as loop:
            col = builder.mul(loop.index, c(width))
            xv = load(builder, ax, builder.add(axoff, col), vty)
            for r in range(4):
                row = builder.add(awoff, builder.mul(ak, c(r)))
                ahead = builder.add(row, builder.mul(ak, c(PREFETCH_ROWS)))
                prefetch(builder, data_ptr(builder, aw, builder.add(ahead, col)))
                wv = load(builder, aw, builder.add(row, col), vty)
                acc = builder.fadd(builder.load(accs[r]), builder.fmul(wv, xv, flags=("fast",)), flags=("fast",))
                builder.store(acc, accs[r])
        out = [reduce_sum(builder, builder.load(a)) for a in accs]
        return context.make_tuple(builder, sg.return_type, out)

    return sig, codegen


@nb.njit(inline="always", fastmath=True, cache=True)
def rows_block_float(x, w, lo, hi, scale, bias, buf):
    """buf[o - lo, b] = x[b] . w[o] (* scale[o]) (+ bias[o]) for o in [lo, hi), every row b of x (B < 4):
    rows four at a time through :func:`rows4` (the last k % width items summed here), the rest one by one.
    x (B, K), w (O, K) C-contiguous of one float dtype; scale, bias (O,) or length 0."""
    k = w.shape[1]
    width = 64 // w.itemsize
    k0 = k - k % width
    xf, wf = x.reshape(x.size), w.reshape(w.size)
    o = lo
    while o < hi:
        n = min(4, hi - o)
        for b in range(x.shape[0]):
            if n == 4:
                a = rows4(xf, b * k, wf, o * k, k)
                for r in range(4):
                    _store(x, w, b, o + r, k0, a[r], scale, bias, buf, lo)
            else:
                for r in range(n):
                    _store(x, w, b, o + r, 0, x[b, 0] - x[b, 0], scale, bias, buf, lo)
        o += n


@nb.njit(inline="always", fastmath=True, cache=True)
def _store(x, w, b, o, k0, acc, scale, bias, buf, lo):
    """buf[o - lo, b] = (acc + the terms k >= k0 of x[b] . w[o]) (* scale[o]) (+ bias[o])."""
    for j in range(k0, w.shape[1]):
        acc += x[b, j] * w[o, j]
    if scale.shape[0] > 0:
        acc *= scale[o]
    if bias.shape[0] > 0:
        acc += bias[o]
    buf[o - lo, b] = acc

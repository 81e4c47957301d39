"""Multi-row products for the decode kernels in register blocks: 4 weight rows x 4 input rows per pass over k.

At batch >= 2 a decode step's products stop being bound by loading the weights: each loaded weight value can
feed several rows. :func:`rows_blocked` writes what :func:`._numba_decode._rows_block` writes (buf[o - lo, b] =
x[b] . w[o] + bias[o]) but keeps 16 accumulators per block, so each loaded weight value feeds four input rows
and each loaded input value four weight rows. One row of x (or too few weight rows) goes the single-row way.
Float weights only; the sums are reassociated (fast math), so results equal the plain products up to rounding.
"""

from __future__ import annotations

import numba as nb

from ._numba_decode import _rows_block


@nb.njit(inline="always", fastmath=True, cache=True)
def _block44(x, w, r0, r1, r2, r3, o):
    """The 4 x 4 products x[r0..r3] . w[o..o+3] (rows of x may repeat), as four 4-tuples (one per x row)."""
    z = x[0, 0] - x[0, 0]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = w[o, k], w[o + 1, k], w[o + 2, k], w[o + 3, k]
        v = x[r0, k]
        a00 += v * w0
        a01 += v * w1
        a02 += v * w2
        a03 += v * w3
        v = x[r1, k]
        a10 += v * w0
        a11 += v * w1
        a12 += v * w2
        a13 += v * w3
        v = x[r2, k]
        a20 += v * w0
        a21 += v * w1
        a22 += v * w2
        a23 += v * w3
        v = x[r3, k]
        a30 += v * w0
        a31 += v * w1
        a32 += v * w2
        a33 += v * w3
    return (a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33)


@nb.njit(inline="always", fastmath=True, cache=True)
def _block24(x, w, r0, r1, o):
    """The 2 x 4 products x[r0, r1] . w[o..o+3] (two input rows: 8 accumulators)."""
    z = x[0, 0] - x[0, 0]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = w[o, k], w[o + 1, k], w[o + 2, k], w[o + 3, k]
        v = x[r0, k]
        a00 += v * w0
        a01 += v * w1
        a02 += v * w2
        a03 += v * w3
        v = x[r1, k]
        a10 += v * w0
        a11 += v * w1
        a12 += v * w2
        a13 += v * w3
    return (a00, a01, a02, a03), (a10, a11, a12, a13)


@nb.njit(inline="always", fastmath=True, cache=True)
def rows_blocked(x, w, lo, hi, bias, buf):
    """buf[o - lo, b] = x[b] . w[o] + bias[o] for o in [lo, hi) and every row b of x (bias of length 0: none).

    x (B, K) and w (O, K) C-contiguous floats of one dtype; buf (>= hi - lo, B). With B >= 2, weight rows go four
    at a time against input rows four (a last two or one: two) at a time; weight rows past a multiple of four
    take :func:`._numba_decode._rows_block`.
    """
    rows = x.shape[0]
    if rows < 2:
        _rows_block(x, w, lo, hi, bias[:0], bias, buf)
        return
    o = lo
    while o + 4 <= hi:
        r = 0
        while r + 4 <= rows:
            blk = _block44(x, w, r, r + 1, r + 2, r + 3, o)
            for i in range(4):
                for j in range(4):
                    buf[o + j - lo, r + i] = blk[i][j]
            r += 4
        left = rows - r
        if left == 3:  # a last 3 repeats its third row
            blk = _block44(x, w, r, r + 1, r + 2, r + 2, o)
            for i in range(3):
                for j in range(4):
                    buf[o + j - lo, r + i] = blk[i][j]
        elif left > 0:  # a last 2, or a last 1 (its row twice)
            two = _block24(x, w, r, rows - 1, o)
            for i in range(left):
                for j in range(4):
                    buf[o + j - lo, r + i] = two[i][j]
        if bias.shape[0] > 0:
            for j in range(4):
                for b in range(rows):
                    buf[o + j - lo, b] += bias[o + j]
        o += 4
    if o < hi:
        _rows_block(x, w, o, hi, bias[:0], bias, buf[o - lo:])

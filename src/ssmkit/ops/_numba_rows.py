"""Row products of the decode kernels: buf[o - lo, b] = x[b] . row o of a float, int8 or packed int4 weight
(scaled, biased), on float activations or on activations quantized per block (the integer rows of
:mod:`._numba_q8` and :mod:`._numba_q4`), and a stage of them shared by the threads (:func:`_rows_stage`).
The overloads pick the kernel from the weight scale's rank while compiling. Jitted code only.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

from ._numba_q4 import int4_group_ok, pack_acts, rows_int4
from ._numba_q8 import QBLOCK, STEP, pack_acts8, quantize_rows, rows_int8
from ._numba_workshare import _next_chunk

_ROWS_LINEAR = 64  # rows per chunk of a shared row stage (the plain linear kernel, the LM head)

@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_row(x, b, w, o, scale, bias):
    """sum_k x[b, k] * w[o, k] (times scale[o] for int8 weights) + bias[o], in x's dtype; scale and bias
    of length 0 mean none."""
    acc = x[b, 0] - x[b, 0]  # a zero of x's dtype; a loop from k = 0 vectorises better than one from 1
    for k in range(x.shape[1]):
        acc += x[b, k] * w[o, k]
    if scale.shape[0] > 0:
        acc *= scale[o]
    if bias.shape[0] > 0:
        acc += bias[o]
    return acc


def _rows_times_weight(x, w, o, scale, bias, out):
    """out[b] = x[b] . row o of the weight (scaled, biased) for every row b of x; w float, int8 with a per-row
    scale (1-D), or packed int4 with group scales (2-D scale, :mod:`ssmkit.ops.int4_linear`). Jitted code only:
    the overload below picks the kernel from the scale's rank while compiling."""
    raise NotImplementedError("_rows_times_weight is called from numba kernels only")


@overload(_rows_times_weight, jit_options={"fastmath": True})
def _rows_times_weight_impl(x, w, o, scale, bias, out):
    if isinstance(scale, types.Array) and scale.ndim == 2:
        return lambda x, w, o, scale, bias, out: _rows_int4(x, w, o, scale, bias, out)
    return lambda x, w, o, scale, bias, out: _rows_dense(x, w, o, scale, bias, out)


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_int4(x, w, o, scale, bias, out):
    """out[b] = x[b] . dequantized row o for every row b: w (O, K / 2) packed int4 bytes, scale (O, groups).
    Nibbles are unpacked in registers; each group's product is summed before its scale multiplies it."""
    n_groups = scale.shape[1]
    half = w.shape[1] // n_groups  # bytes per group = group_size / 2
    for b in range(x.shape[0]):
        acc = x[b, 0] - x[b, 0]
        for g in range(n_groups):
            base = 2 * half * g
            wb = half * g
            s = x[b, 0] - x[b, 0]
            for j in range(half):
                v = np.int32(w[o, wb + j])
                s += (x[b, base + j] * np.float32((v & 15) - 8)
                      + x[b, base + half + j] * np.float32(((v >> 4) & 15) - 8))
            acc += s * scale[o, g]
        if bias.shape[0] > 0:
            acc += bias[o]
        out[b] = acc


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_dense(x, w, o, scale, bias, out):
    """out[b] = _dot_row(x, b, w, o, scale, bias) for every row b of x; rows go four at a time so each load
    of the weight row feeds four products (decode batches make the product compute-bound, not load-bound)."""
    n = x.shape[0]
    b = 0
    while b + 4 <= n:
        a0 = x[b, 0] - x[b, 0]
        a1 = a0
        a2 = a0
        a3 = a0
        for k in range(x.shape[1]):
            wv = w[o, k]
            a0 += x[b, k] * wv
            a1 += x[b + 1, k] * wv
            a2 += x[b + 2, k] * wv
            a3 += x[b + 3, k] * wv
        if scale.shape[0] > 0:
            s = scale[o]
            a0 *= s
            a1 *= s
            a2 *= s
            a3 *= s
        if bias.shape[0] > 0:
            a0 += bias[o]
            a1 += bias[o]
            a2 += bias[o]
            a3 += bias[o]
        out[b], out[b + 1], out[b + 2], out[b + 3] = a0, a1, a2, a3
        b += 4
    while b < n:
        out[b] = _dot_row(x, b, w, o, scale, bias)
        b += 1


def _rows_block(x, w, lo, hi, scale, bias, buf):
    """buf[o - lo, b] = x[b] . row o of the weight (scaled, biased) for o in [lo, hi) and every row b of x
    (buf: (>= hi - lo, B)). For fewer than 4 rows of x, float and int8 weights go four weight rows at a time
    (four independent streams from memory: one core reads about twice as fast as row by row); int4 rows, and
    4 or more rows of x, go row by row as in :func:`_rows_times_weight`. Jitted code only."""
    raise NotImplementedError("_rows_block is called from numba kernels only")


@overload(_rows_block, jit_options={"fastmath": True})
def _rows_block_impl(x, w, lo, hi, scale, bias, buf):
    if isinstance(scale, types.Array) and scale.ndim == 2:
        def by_row(x, w, lo, hi, scale, bias, buf):
            for o in range(lo, hi):
                _rows_int4(x, w, o, scale, bias, buf[o - lo])
        return by_row
    return lambda x, w, lo, hi, scale, bias, buf: _rows_block_dense(x, w, lo, hi, scale, bias, buf)


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_block_dense(x, w, lo, hi, scale, bias, buf):
    """:func:`_rows_block` for float or int8 (per-row scale) weights."""
    o = lo
    if x.shape[0] < 4:
        while o + 4 <= hi:
            for b in range(x.shape[0]):
                a0 = x[b, 0] - x[b, 0]
                a1 = a0
                a2 = a0
                a3 = a0
                for k in range(x.shape[1]):
                    xv = x[b, k]
                    a0 += xv * w[o, k]
                    a1 += xv * w[o + 1, k]
                    a2 += xv * w[o + 2, k]
                    a3 += xv * w[o + 3, k]
                if scale.shape[0] > 0:
                    a0 *= scale[o]
                    a1 *= scale[o + 1]
                    a2 *= scale[o + 2]
                    a3 *= scale[o + 3]
                if bias.shape[0] > 0:
                    a0 += bias[o]
                    a1 += bias[o + 1]
                    a2 += bias[o + 2]
                    a3 += bias[o + 3]
                buf[o - lo, b], buf[o + 1 - lo, b], buf[o + 2 - lo, b], buf[o + 3 - lo, b] = a0, a1, a2, a3
            o += 4
    while o < hi:
        _rows_dense(x, w, o, scale, bias, buf[o - lo])
        o += 1


@nb.njit(inline="always", cache=True)
def _act_buffers(n_rows, cols, like):
    """One thread's buffers for the integer-activation products of inputs (n_rows, cols): quantized values
    (int8), block scales and dequantized activations (like's dtype), and the lane layout of the integer products
    (int8 activations in the int4 weight's order, int32 lane offsets, lane scales in like's dtype); see
    :func:`_prep_q`."""
    steps = (cols + STEP - 1) // STEP
    return (np.zeros((n_rows, cols), dtype=np.int8),
            np.zeros((n_rows, (cols + QBLOCK - 1) // QBLOCK), dtype=like.dtype),
            np.zeros((n_rows, cols), dtype=like.dtype),
            np.zeros((n_rows, STEP * steps), dtype=np.int8),
            np.zeros((n_rows, 16 * steps), dtype=np.int32),
            np.zeros((n_rows, 16 * steps), dtype=like.dtype))


def _prep_q(x, quant, scale, qbuf):
    """Before a stage's products (every thread, after the barrier that completes x): with ``quant`` and a
    quantized weight (scale of nonzero length), quantize x into this thread's buffers qbuf
    (:func:`ssmkit.ops._numba_q8.quantize_rows`) and lay it out for the weight's integer products
    (:func:`ssmkit.ops._numba_q8.pack_acts8`; int4 of group 32, 64 or 128, a 2-D scale:
    :func:`ssmkit.ops._numba_q4.pack_acts`). Jitted code only."""
    raise NotImplementedError("_prep_q is called from numba kernels only")


@overload(_prep_q)
def _prep_q_impl(x, quant, scale, qbuf):
    if isinstance(scale, types.Array) and scale.ndim == 2:
        def int4(x, quant, scale, qbuf):
            if quant:
                quantize_rows(x, qbuf[0], qbuf[1], qbuf[2])
                group = x.shape[1] // scale.shape[1]
                if group == 32 or group == 64 or group == 128:
                    pack_acts(qbuf[0], qbuf[1], group, qbuf[3], qbuf[4], qbuf[5])
        return int4

    def dense(x, quant, scale, qbuf):
        if quant and scale.shape[0] > 0:
            quantize_rows(x, qbuf[0], qbuf[1], qbuf[2])
            pack_acts8(qbuf[0], qbuf[1], qbuf[4], qbuf[5])
    return dense


def _rows_q(x, quant, qbuf, w, lo, hi, scale, bias, buf):
    """:func:`_rows_block`, or with ``quant`` and a quantized weight its integer-activation form on the buffers
    that :func:`_prep_q` filled: int8 rows and int4 rows of group 32/64/128 multiply int8 activations
    (:mod:`._numba_q8`, :mod:`._numba_q4`); int4 of group 16 takes the float rows on the dequantized
    activations (same numbers). Jitted code only."""
    raise NotImplementedError("_rows_q is called from numba kernels only")


@overload(_rows_q, jit_options={"fastmath": True})
def _rows_q_impl(x, quant, qbuf, w, lo, hi, scale, bias, buf):
    if isinstance(scale, types.Array) and scale.ndim == 2:
        def int4(x, quant, qbuf, w, lo, hi, scale, bias, buf):
            if not quant:
                _rows_block(x, w, lo, hi, scale, bias, buf)
            elif int4_group_ok(w, scale):
                rows_int4(qbuf[3], qbuf[4], qbuf[5], w, lo, hi, scale, bias, buf)
            else:
                _rows_block(qbuf[2], w, lo, hi, scale, bias, buf)
        return int4

    def dense(x, quant, qbuf, w, lo, hi, scale, bias, buf):
        if quant and scale.shape[0] > 0:
            rows_int8(qbuf[0], qbuf[1], qbuf[4], qbuf[5], w, lo, hi, scale, bias, buf)
        else:
            _rows_block(x, w, lo, hi, scale, bias, buf)
    return dense


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_stage(x, quant, qbuf, w, scale, bias, out, counters, stage, t, n_threads, col, cursor):
    """out[:, o] = x @ w[o] (scaled, biased) for every row o of w, shared by the threads (no barrier after: the
    launch ends when every thread is done); with ``quant``, x as :func:`_prep_q` quantized it into qbuf.
    col: scratch (>= _ROWS_LINEAR, B)."""
    n_chunks = (w.shape[0] + _ROWS_LINEAR - 1) // _ROWS_LINEAR
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_LINEAR, min(w.shape[0], chunk * _ROWS_LINEAR + _ROWS_LINEAR)
        _rows_q(x, quant, qbuf, w, lo, hi, scale, bias, col)
        for o in range(lo, hi):
            for b in range(x.shape[0]):
                out[b, o] = col[o - lo, b]

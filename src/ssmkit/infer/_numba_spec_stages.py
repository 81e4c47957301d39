"""The building blocks of :mod:`._numba_spec`: node-row products in 4 x 4 register blocks, a vectorised float32
exp, and the four per-layer stages (in_proj + conv, x_proj, scan, out_proj) over a set of active node rows.

The arithmetic is the fused decode step's (:func:`ssmkit.ops.mamba_stack_step`) with a node's parent in place of
the previous token; the products are summed in blocks and float32 uses its own exp, so results equal the decode
step's up to float rounding (float64 uses libm's exp).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

from ..ops._numba_decode import _rows_times_weight
from ..ops._numba_kernels import fast_softplus
from ..ops._numba_rowblock import _block44 as _block  # the 4 x 4 register block, shared with the hybrid decode kernel

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@nb.njit(inline="always", fastmath=True, cache=True)
def _decay32(dt, neg_a, out, bits, scale):
    """out[n] = exp(dt * neg_a[n]) for float32 in two plain loops LLVM vectorises (the scale 2**k goes through
    the int32 scratch ``bits``, of which ``scale`` is a float32 view): Cody-Waite reduction and a degree-6
    polynomial, about 2.4e-7 relative error."""
    for n in range(out.shape[0]):
        v = min(max(dt * neg_a[n], np.float32(-87.0)), np.float32(88.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[n] = p * r * r + r + np.float32(1.0)
        bits[n] = (np.int32(k) + np.int32(127)) << 23
    for n in range(out.shape[0]):
        out[n] *= scale[n]


def _decay(dt, neg_a, out, bits, scale):
    """out[n] = exp(dt * neg_a[n]); jitted code only (float32: :func:`_decay32`, float64: libm exp)."""
    raise NotImplementedError("_decay is called from numba kernels only")


@overload(_decay, inline="always", jit_options={"fastmath": True})
def _decay_impl(dt, neg_a, out, bits, scale):
    if isinstance(dt, types.Float) and dt.bitwidth == 32:
        return lambda dt, neg_a, out, bits, scale: _decay32(dt, neg_a, out, bits, scale)

    def exact(dt, neg_a, out, bits, scale):
        for n in range(out.shape[0]):
            out[n] = math.exp(dt * neg_a[n])
    return exact


@nb.njit(inline="always", fastmath=True, cache=True)
def _silu_into(v, out, tmp, bits, scale):
    """out[j] = silu(v[j]) = v[j] / (1 + exp(-v[j])) as flat loops (vectorised exp for float32); tmp has v's
    length, bits (int32) and its float32 view scale at least that."""
    minus = -np.ones(1, dtype=v.dtype)[0]
    _decay(minus, v, tmp, bits, scale)
    for j in range(v.shape[0]):
        out[j] = v[j] / (1 + tmp[j])


@nb.njit(inline="always", fastmath=True, cache=True)
def _softplus32_into(v, m, e, bits, scale):
    """v[j] = softplus(v[j]) = max(v, 0) + log1p(exp(-|v|)) in flat float32 loops (log1p(a) = 2 atanh(a / (2 + a))
    by its odd series, as :func:`ssmkit.ops._numba_kernels.fast_softplus`); m, e: scratch of v's length (apart,
    so the loops vectorise)."""
    for j in range(v.shape[0]):
        m[j] = -abs(v[j])
    _decay32(np.float32(1.0), m, e, bits, scale)
    for j in range(v.shape[0]):
        a = e[j]
        s = a / (np.float32(2.0) + a)
        z = s * s
        p = np.float32(1.0 / 15.0)
        p = p * z + np.float32(1.0 / 13.0)
        p = p * z + np.float32(1.0 / 11.0)
        p = p * z + np.float32(1.0 / 9.0)
        p = p * z + np.float32(1.0 / 7.0)
        p = p * z + np.float32(1.0 / 5.0)
        p = p * z + np.float32(1.0 / 3.0)
        p = p * z + np.float32(1.0)
        v[j] = max(v[j], np.float32(0.0)) + np.float32(2.0) * s * p


def _softplus_into(v, m, e, bits, scale):
    """v[j] = softplus(v[j]) in place; jitted code only (float32: :func:`_softplus32_into`, float64: libm)."""
    raise NotImplementedError("_softplus_into is called from numba kernels only")


@overload(_softplus_into, inline="always", jit_options={"fastmath": True})
def _softplus_into_impl(v, m, e, bits, scale):
    if isinstance(v.dtype, types.Float) and v.dtype.bitwidth == 32:
        return lambda v, m, e, bits, scale: _softplus32_into(v, m, e, bits, scale)

    def exact(v, m, e, bits, scale):
        for j in range(v.shape[0]):
            v[j] = fast_softplus(v[j])
    return exact


@nb.njit(inline="always", fastmath=True, cache=True)
def _block6(x, w, r, last, o):
    """The 6 x 4 products x[r..r+5] . w[o..o+3], rows past ``last`` repeating it: one pass over the weight rows
    for 5 or 6 node rows (24 accumulators, which AVX-512's 32 vector registers hold)."""
    r1, r2, r3, r4, r5 = min(r + 1, last), min(r + 2, last), min(r + 3, last), min(r + 4, last), min(r + 5, last)
    z = x[0, 0] - x[0, 0]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = z
    a30 = a31 = a32 = a33 = a40 = a41 = a42 = a43 = a50 = a51 = a52 = a53 = z
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = w[o, k], w[o + 1, k], w[o + 2, k], w[o + 3, k]
        v = x[r, k]
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
        v = x[r4, k]
        a40 += v * w0
        a41 += v * w1
        a42 += v * w2
        a43 += v * w3
        v = x[r5, k]
        a50 += v * w0
        a51 += v * w1
        a52 += v * w2
        a53 += v * w3
    return ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33),
            (a40, a41, a42, a43), (a50, a51, a52, a53))


@nb.njit(fastmath=True, cache=True)
def _gemm(x, w, scale, bias, o_lo, o_hi, out, col):
    """out[a, o] = x[a] . w[o] (+ bias[o]) for o in [o_lo, o_hi) and every row a. Float weights go in 4 x 4
    register blocks (the verify pass has several rows, so the products are no longer bound by loading the
    weights); int8/int4 weights (a scale given) and the tails take the decode kernel's row products."""
    rows = x.shape[0]
    o = o_lo
    if scale.size == 0:
        while o + 4 <= o_hi:
            r = 0
            while r < rows:
                if rows - r == 5 or rows - r == 6:  # the last 5 or 6 rows in one pass
                    six = _block6(x, w, r, rows - 1, o)
                    for i in range(rows - r):
                        for j in range(4):
                            out[r + i, o + j] = six[i][j]
                    break
                last = rows - 1  # a last partial block repeats its last row
                blk = _block(x, w, r, min(r + 1, last), min(r + 2, last), min(r + 3, last), o)
                for i in range(min(4, rows - r)):
                    for j in range(4):
                        out[r + i, o + j] = blk[i][j]
                r += 4
            if bias.shape[0] > 0:
                for a in range(rows):
                    for j in range(4):
                        out[a, o + j] += bias[o + j]
            o += 4
    while o < o_hi:
        _rows_times_weight(x, w, o, scale, bias, col)
        for a in range(rows):
            out[a, o] = col[a]
        o += 1


@nb.njit(fastmath=True, cache=True)
def _in_conv(o_lo, o_hi, xn, wi, si, bi, cw_t, cb, cs_t, win, act_b, act_i, n_nodes, nx, xz, u, col, work, bits):
    """in_proj rows [o_lo, o_hi) for every active row; the x half is stored per node (``nx``) and goes through the
    causal conv over the node's path (``win``) and SiLU. cw_t (K, Di) the conv weight transposed, cs_t (B, K - 1, Di)
    the conv state transposed, so every loop runs over contiguous channels (and vectorises). work (>= 2 (o_hi -
    o_lo)) and bits (int32, >= o_hi - o_lo): this thread's scratch."""
    di = u.shape[1]
    width = cw_t.shape[0]
    _gemm(xn, wi, si, bi, o_lo, o_hi, xz, col)
    hi = min(o_hi, di)
    if o_lo >= hi:
        return
    n = hi - o_lo
    for a in range(xn.shape[0]):
        dst, src = nx[act_b[a] * n_nodes + act_i[a], o_lo:hi], xz[a, o_lo:hi]
        for o in range(n):
            dst[o] = src[o]
    acc, tmp = work[:n], work[n:2 * n]
    bits = bits[:n]
    scale = bits.view(np.float32)
    for a in range(xn.shape[0]):
        b, i = act_b[a], act_i[a]
        last, xa = cw_t[width - 1, o_lo:hi], xz[a, o_lo:hi]
        for o in range(n):
            acc[o] = last[o] * xa[o]
        for j in range(width - 1):
            p = win[i, j]
            src = cs_t[b, p, o_lo:hi] if p < width - 1 else nx[b * n_nodes + p - (width - 1), o_lo:hi]
            cwj = cw_t[j, o_lo:hi]
            for o in range(n):
                acc[o] += cwj[o] * src[o]
        if cb.shape[0] > 0:
            cbs = cb[o_lo:hi]
            for o in range(n):
                acc[o] += cbs[o]
        _silu_into(acc, u[a, o_lo:hi], tmp, bits, scale)


@nb.njit(fastmath=True, cache=True)
def _x_rows(r_lo, r_hi, u, wx, sx, none, xdbl, col):
    _gemm(u, wx, sx, none, r_lo, r_hi, xdbl, col)


@nb.njit(cache=True)
def scan_scratch(n_state: int, channels: int) -> tuple[int, int]:
    """(float, int32) scratch lengths :func:`_scan` needs for chunks of up to ``channels`` channels."""
    return 2 * n_state * channels + 6 * channels, n_state * channels


@nb.njit(fastmath=True, cache=True)
def _scan(c_lo, c_hi, wdt_t, bdt, neg_a_t, dsk, ss, sn, parents, act_b, act_i, xdbl, xz, u, y, work, bits):
    """Channels [c_lo, c_hi): each active node's state from its parent's (or the initial state for the root);
    active rows must come after their parents' (breadth-first order). States are stored state-major: ss (B, N, Di)
    the initial states, sn (B, T, N, Di) every node's, so every loop (dt, softplus, the decays, the state update
    and y) runs over the chunk's contiguous channels and vectorises, with no reduction across lanes. wdt_t (R, Di)
    is dt_proj's weight transposed, neg_a_t (N, Di) = -exp(A_log) transposed. work / bits: this thread's scratch
    (:func:`scan_scratch`)."""
    di = u.shape[1]
    rank, n_state = wdt_t.shape[0], neg_a_t.shape[0]
    cn = c_hi - c_lo
    size = cn * n_state
    arg, decay = work[:size], work[size:2 * size]
    o = 2 * size
    dts, gate, t1 = work[o:o + cn], work[o + cn:o + 2 * cn], work[o + 2 * cn:o + 3 * cn]
    t2, du, yacc = work[o + 3 * cn:o + 4 * cn], work[o + 4 * cn:o + 5 * cn], work[o + 5 * cn:o + 6 * cn]
    bits = bits[:size]
    scale = bits.view(np.float32)
    one = np.ones(1, dtype=u.dtype)[0]
    bd, dska = bdt[c_lo:c_hi], dsk[c_lo:c_hi]
    for a in range(u.shape[0]):
        b, i = act_b[a], act_i[a]
        p = parents[i]
        xa = xdbl[a]
        for c in range(cn):
            dts[c] = bd[c]
        for r in range(0, rank - 3, 4):  # 4 rank rows per pass over dts (a quarter of its loads and stores)
            x0, x1, x2, x3 = xa[r], xa[r + 1], xa[r + 2], xa[r + 3]
            w0, w1 = wdt_t[r, c_lo:c_hi], wdt_t[r + 1, c_lo:c_hi]
            w2, w3 = wdt_t[r + 2, c_lo:c_hi], wdt_t[r + 3, c_lo:c_hi]
            for c in range(cn):
                dts[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c]
        for r in range(rank - rank % 4, rank):
            xr, wr = xa[r], wdt_t[r, c_lo:c_hi]
            for c in range(cn):
                dts[c] += xr * wr[c]
        _softplus_into(dts, t1, t2, bits, scale)
        for n in range(n_state):
            nan, an = neg_a_t[n, c_lo:c_hi], arg[n * cn:(n + 1) * cn]
            for c in range(cn):
                an[c] = dts[c] * nan[c]
        _decay(one, arg, decay, bits, scale)
        _silu_into(xz[a, di + c_lo:di + c_hi], gate, t1, bits, scale)
        ua = u[a, c_lo:c_hi]
        for c in range(cn):
            du[c] = dts[c] * ua[c]
            yacc[c] = dska[c] * ua[c]
        src2 = ss[b] if p < 0 else sn[b, p]  # (N, Di) views made once per row
        dst2 = sn[b, i]
        for n in range(n_state):
            src, dst, dec = src2[n, c_lo:c_hi], dst2[n, c_lo:c_hi], decay[n * cn:(n + 1) * cn]
            bn, cvn = xdbl[a, rank + n], xdbl[a, rank + n_state + n]
            for c in range(cn):
                hv = src[c] * dec[c] + du[c] * bn
                dst[c] = hv
                yacc[c] += hv * cvn
        ya = y[a, c_lo:c_hi]
        for c in range(cn):
            ya[c] = yacc[c] * gate[c]


@nb.njit(fastmath=True, cache=True)
def _out_rows(o_lo, o_hi, y, wo, so, bo, h, tmp, col):
    """h[:, o] += out_proj(y)[:, o] for o in [o_lo, o_hi) (tmp: (rows, d_model) scratch)."""
    _gemm(y, wo, so, bo, o_lo, o_hi, tmp, col)
    for a in range(y.shape[0]):
        for o in range(o_lo, o_hi):
            h[a, o] += tmp[a, o]

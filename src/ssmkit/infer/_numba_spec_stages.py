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
def _block(x, w, r, o):
    """The 4 x 4 products x[r..r+3] . w[o..o+3] (a register block: each loaded value feeds four products)."""
    z = x[0, 0] - x[0, 0]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for k in range(x.shape[1]):
        w0, w1, w2, w3 = w[o, k], w[o + 1, k], w[o + 2, k], w[o + 3, k]
        x0, x1, x2, x3 = x[r, k], x[r + 1, k], x[r + 2, k], x[r + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    return (a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33)


@nb.njit(inline="always", fastmath=True, cache=True)
def _row4(x, w, r, o):
    z = x[0, 0] - x[0, 0]
    a0 = a1 = a2 = a3 = z
    for k in range(x.shape[1]):
        v = x[r, k]
        a0 += v * w[o, k]
        a1 += v * w[o + 1, k]
        a2 += v * w[o + 2, k]
        a3 += v * w[o + 3, k]
    return a0, a1, a2, a3


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
            while r + 4 <= rows:
                blk = _block(x, w, r, o)
                for i in range(4):
                    for j in range(4):
                        out[r + i, o + j] = blk[i][j]
                r += 4
            while r < rows:
                v = _row4(x, w, r, o)
                for j in range(4):
                    out[r, o + j] = v[j]
                r += 1
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
def _in_conv(o_lo, o_hi, xn, wi, si, bi, cw, cb, cs, win, act_b, act_i, n_nodes, nx, xz, u, col):
    """in_proj rows [o_lo, o_hi) for every active row; the x half is stored per node and goes through the causal
    conv over the node's path (``win``) and SiLU."""
    di = u.shape[1]
    width = cw.shape[1]
    _gemm(xn, wi, si, bi, o_lo, o_hi, xz, col)
    for o in range(o_lo, min(o_hi, di)):
        for a in range(xn.shape[0]):
            nx[act_b[a] * n_nodes + act_i[a], o] = xz[a, o]
        for a in range(xn.shape[0]):
            b, i = act_b[a], act_i[a]
            acc = cw[o, width - 1] * xz[a, o]
            for j in range(width - 1):
                p = win[i, j]
                if p < width - 1:
                    acc += cw[o, j] * cs[b, o, p]
                else:
                    acc += cw[o, j] * nx[b * n_nodes + p - (width - 1), o]
            if cb.shape[0] > 0:
                acc += cb[o]
            u[a, o] = acc
    hi = min(o_hi, di)
    if o_lo < hi:
        tmp = np.empty(hi - o_lo, dtype=u.dtype)
        bits = np.empty(hi - o_lo, dtype=np.int32)
        scale = bits.view(np.float32)
        for a in range(xn.shape[0]):
            _silu_into(u[a, o_lo:hi], u[a, o_lo:hi], tmp, bits, scale)


@nb.njit(fastmath=True, cache=True)
def _x_rows(r_lo, r_hi, u, wx, sx, none, xdbl, col):
    _gemm(u, wx, sx, none, r_lo, r_hi, xdbl, col)


@nb.njit(fastmath=True, cache=True)
def _scan(c_lo, c_hi, wdt, bdt, al, dsk, ss, sn, parents, act_b, act_i, xdbl, xz, u, y):
    """Channels [c_lo, c_hi): each active node's state from its parent's (or the initial state for the root);
    active rows must come after their parents' (breadth-first order). The decays of all the chunk's (channel,
    state) pairs are one flat exp loop per row (short loops over the state alone do not vectorise well)."""
    di = u.shape[1]
    rank, n_state = wdt.shape[1], al.shape[1]
    size = (c_hi - c_lo) * n_state
    neg_a = np.empty(size, dtype=u.dtype)
    arg = np.empty(size, dtype=u.dtype)
    decay = np.empty(size, dtype=u.dtype)
    dts = np.empty(c_hi - c_lo, dtype=u.dtype)
    gate = np.empty(c_hi - c_lo, dtype=u.dtype)
    bits = np.empty(size, dtype=np.int32)
    scale = bits.view(np.float32)
    one = np.ones(1, dtype=u.dtype)[0]
    _decay(one, al.ravel()[c_lo * n_state:c_hi * n_state], neg_a, bits, scale)
    for j in range(size):
        neg_a[j] = -neg_a[j]
    for a in range(u.shape[0]):
        b, i = act_b[a], act_i[a]
        p = parents[i]
        for c in range(c_lo, c_hi):
            dv = bdt[c]
            for r in range(rank):
                dv += wdt[c, r] * xdbl[a, r]
            dt = fast_softplus(dv)
            dts[c - c_lo] = dt
            for n in range(n_state):
                arg[(c - c_lo) * n_state + n] = dt * neg_a[(c - c_lo) * n_state + n]
        _decay(one, arg, decay, bits, scale)
        _silu_into(xz[a, di + c_lo:di + c_hi], gate, arg[:c_hi - c_lo], bits, scale)
        bv, cv = xdbl[a, rank:rank + n_state], xdbl[a, rank + n_state:rank + 2 * n_state]
        for c in range(c_lo, c_hi):
            dt = dts[c - c_lo]
            uc = u[a, c]
            du = dt * uc
            acc = dsk[c] * uc
            if p < 0:
                src = ss[b, c]
            else:
                src = sn[b, p, c]
            dst = sn[b, i, c]
            dec = decay[(c - c_lo) * n_state:(c - c_lo + 1) * n_state]
            for n in range(n_state):
                hv = src[n] * dec[n] + du * bv[n]
                dst[n] = hv
                acc += hv * cv[n]
            y[a, c] = acc * gate[c - c_lo]


@nb.njit(fastmath=True, cache=True)
def _out_rows(o_lo, o_hi, y, wo, so, bo, h, tmp, col):
    """h[:, o] += out_proj(y)[:, o] for o in [o_lo, o_hi) (tmp: (rows, d_model) scratch)."""
    _gemm(y, wo, so, bo, o_lo, o_hi, tmp, col)
    for a in range(y.shape[0]):
        for o in range(o_lo, o_hi):
            h[a, o] += tmp[a, o]

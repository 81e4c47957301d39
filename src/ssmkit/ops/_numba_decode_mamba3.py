"""Numba kernel for decoding a stack of Mamba-3 blocks: one token for a few rows in one parallel launch.

The work sharing (stage counters, chunk claiming, barriers), the matrix-row products and the RMSNorm are those of
:mod:`._numba_decode`. The SSM core of each (row, head) makes one pass over the state rows with fast math (FMA,
vectorised sums): 1.08-1.33x faster for the whole step than running the sequence kernel's exact ``_step`` and
``_dot`` (measured at d_model 768, 24 layers, batch 1 and 8, docs/mamba3.md), so it equals
:func:`ssmkit.ops.mamba3_step`'s kernel up to rounding (float64 tests: 1e-12), not bit for bit. Arrays are
C-contiguous; float32 or float64 throughout (one dtype per call); float weights only.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._numba_decode import (
    _ROWS_LINEAR,
    _claim,
    _finish_stage,
    _next_chunk,
    _norm_stage,
    _rms_norm,
    _rows_block,
    _silu,
    _wait_stage,
)
from ._numba_mamba3 import _TWO_PI

#: stages per layer (block norm, in_proj and its elementwise tails, B/C norms, SSM, out_proj); the kernel needs
#: counter_slots(STAGES * L + 2, threads) counters
STAGES = 5
_ROWS_IN = 32  # in_proj rows per chunk
_ROWS_OUT = 16  # out_proj rows per chunk


@nb.njit(fastmath=True, cache=True)
def _rows(x, w, lo, hi, bias, col):
    """col[o - lo, b] = x[b] . w[o] + bias[o] for o in [lo, hi) (float weights; bias of length 0: none). One
    compiled copy for every product of the kernel (inlining it at each use multiplies the compile time)."""
    _rows_block(x, w, lo, hi, bias[:0], bias, col)


@nb.njit(fastmath=True, cache=True)
def head_stage(counters, stage, t, n_threads, cursor, x, w, bias, out, col):
    """out[:, o] = x @ w[o] + bias[o] for every row o of w, shared by the threads (no barrier after: the launch
    ends when every thread is done)."""
    n_chunks = (w.shape[0] + _ROWS_LINEAR - 1) // _ROWS_LINEAR
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_LINEAR, min(w.shape[0], chunk * _ROWS_LINEAR + _ROWS_LINEAR)
        _rows(x, w, lo, hi, bias, col)
        for o in range(lo, hi):
            for b in range(x.shape[0]):
                out[b, o] = col[o - lo, b]


@nb.njit(inline="always", fastmath=True, cache=True)
def _softplus(v):
    return v if v > 20 else math.log1p(math.exp(v))


@nb.njit(fastmath=True, cache=True)
def in_proj_tail(col, lo_, hi_, zb, xs, bc, dts, As, lams, ws, dtb, mx, a_floor):
    """in_proj rows lo_..hi_ (products in col (rows, B)), split (z, x, B, C, dt, A, trap, angles), to their uses:
    z into zb (B, Di); x times mimo_x (mx (H, R, P), length 0 for SISO) into xs (B, 1, R, H, P); B and C raw
    into bc (B, 2 R G N); dt = softplus(. + dtb), A = -max(softplus(.), a_floor), trap = sigmoid(.) into
    dts, As, lams (B, 1, H); the angle rates pi tanh(.) into ws (B, 1, H, S) for every head."""
    nb_rows, di = zb.shape
    R, H, P = xs.shape[2], xs.shape[3], xs.shape[4]
    n_bc = bc.shape[1]
    for o in range(lo_, hi_):
        if o < di:
            for b in range(nb_rows):
                zb[b, o] = col[o - lo_, b]
        elif o < 2 * di:
            c = o - di
            hh, p = c // P, c % P
            for b in range(nb_rows):
                v = col[o - lo_, b]
                for r in range(R):
                    xs[b, 0, r, hh, p] = v * mx[hh, r, p] if mx.shape[0] > 0 else v
        elif o < 2 * di + n_bc:
            for b in range(nb_rows):
                bc[b, o - 2 * di] = col[o - lo_, b]
        else:
            j = o - 2 * di - n_bc
            for b in range(nb_rows):
                v = col[o - lo_, b]
                if j < H:
                    dts[b, 0, j] = _softplus(v + dtb[j])
                elif j < 2 * H:
                    As[b, 0, j - H] = -max(_softplus(v), a_floor)
                elif j < 3 * H:
                    lams[b, 0, j - 2 * H] = 1 / (1 + math.exp(-v))
                else:
                    rate = math.pi * math.tanh(v)
                    for hh in range(H):
                        ws[b, 0, hh, j - 3 * H] = rate


@nb.njit(fastmath=True, cache=True)
def in_proj_stage(counters, stage, t, n_threads, cursor, xn, wi, bi, col, zb, xs, bc, dts, As, lams, ws, dtb, mx,
                  a_floor):
    """in_proj of xn in chunks of _ROWS_IN rows, each through :func:`in_proj_tail` (one counter stage)."""
    n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n1, t, n_threads, cursor)
        if chunk < 0:
            break
        lo_, hi_ = chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN)
        _rows(xn, wi, lo_, hi_, bi, col)
        in_proj_tail(col, lo_, hi_, zb, xs, bc, dts, As, lams, ws, dtb, mx, a_floor)
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n1, n_threads)


@nb.njit(fastmath=True, cache=True)
def out_proj_stage(counters, stage, t, n_threads, cursor, y, wo, bo, col, h):
    """h += out_proj(y) in chunks of _ROWS_OUT rows (one counter stage)."""
    n4 = (wo.shape[0] + _ROWS_OUT - 1) // _ROWS_OUT
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n4, t, n_threads, cursor)
        if chunk < 0:
            break
        lo_, hi_ = chunk * _ROWS_OUT, min(wo.shape[0], chunk * _ROWS_OUT + _ROWS_OUT)
        _rows(y, wo, lo_, hi_, bo, col)
        for o in range(lo_, hi_):
            for b in range(h.shape[0]):
                h[b, o] += col[o - lo_, b]
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n4, n_threads)


@nb.njit(fastmath=True, cache=True)
def bc_norm_stage(counters, stage, t, n_threads, cursor, bc, bn, cn, beps, ceps, B5, C5):
    """The RMSNorms of B and C over N, one chunk per (row, B or C, rank, group): bc (B, 2 R G N) raw ->
    B5, C5 (B, 1, R, G, N) (one counter stage)."""
    nb_rows = bc.shape[0]
    R, G, N = B5.shape[2], B5.shape[3], B5.shape[4]
    n_chunks = nb_rows * 2 * R * G
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        b, rest = chunk // (2 * R * G), chunk % (2 * R * G)
        which, rg = rest // (R * G), rest % (R * G)
        r, g = rg // G, rg % G
        off = which * R * G * N + rg * N
        ms = bc[b, off] * bc[b, off]
        for n in range(1, N):
            ms += bc[b, off + n] * bc[b, off + n]
        inv = 1 / math.sqrt(ms / N + (beps if which == 0 else ceps))
        for n in range(N):
            if which == 0:
                B5[b, 0, r, g, n] = bc[b, off + n] * inv * bn[n]
            else:
                C5[b, 0, r, g, n] = bc[b, off + n] * inv * cn[n]
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n_chunks, n_threads)


@nb.njit(fastmath=True, cache=True)
def _head(bi, hh, g, xs, dts, As, lams, B5, C5, Bb, Cb, ws, dsk, th0, h0, k0, x0, th1, h1, k1, zb, mz, mo, y, k, q,
          cs, sn):
    """Row bi, head hh (of group g): the angles th0 + dt w (mod 2 pi) into th1; the rotated key and query
    k~ = Rot(th)(B + B_bias), q~ = Rot(th)(C + C_bias) per rank (k~ into k1); per state row p, in one pass,
    h1 = alpha h0 + sum_r (beta x0_r k0_r + gamma x_r k~_r) and y_r = h1 q~_r + D x_r, then the gate silu(z) (MIMO:
    silu(z mimo_z_r), summed over r with mimo_o_r) into y. Fast math: sums reassociated and fused (FMA), so the
    result equals :func:`ssmkit.ops.mamba3_step`'s kernel up to rounding, not bit for bit."""
    R, P = xs.shape[2], xs.shape[4]
    N, S = k.shape[1], cs.shape[0]
    d = dts[bi, 0, hh]
    for s in range(S):
        v = th0[bi, hh, s] + d * ws[bi, 0, hh, s]
        v = v - _TWO_PI * math.floor(v / _TWO_PI)
        th1[bi, hh, s] = v
        cs[s] = math.cos(v)
        sn[s] = math.sin(v)
    for r in range(R):
        for n in range(N):
            k[r, n] = B5[bi, 0, r, g, n] + Bb[hh, r, n]
            q[r, n] = C5[bi, 0, r, g, n] + Cb[hh, r, n]
        for s in range(S):
            a0, a1 = k[r, 2 * s], k[r, 2 * s + 1]
            k[r, 2 * s] = a0 * cs[s] - a1 * sn[s]
            k[r, 2 * s + 1] = a0 * sn[s] + a1 * cs[s]
            a0, a1 = q[r, 2 * s], q[r, 2 * s + 1]
            q[r, 2 * s] = a0 * cs[s] - a1 * sn[s]
            q[r, 2 * s + 1] = a0 * sn[s] + a1 * cs[s]
        for n in range(N):
            k1[bi, r, hh, n] = k[r, n]
    alpha = math.exp(d * As[bi, 0, hh])
    lm = lams[bi, 0, hh]
    beta = (1 - lm) * d * alpha
    gamma = lm * d
    for p in range(P):
        hn, ho = h1[bi, hh, p], h0[bi, hh, p]
        for n in range(N):
            hn[n] = ho[n] * alpha
        for r in range(R):
            c1, c2 = beta * x0[bi, r, hh, p], gamma * xs[bi, 0, r, hh, p]
            kp = k0[bi, r, hh]
            for n in range(N):
                hn[n] += c1 * kp[n] + c2 * k[r, n]
        c = hh * P + p
        acc = zb[bi, c] - zb[bi, c]
        for r in range(R):
            a = acc - acc
            for n in range(N):
                a += hn[n] * q[r, n]
            v = a + dsk[hh] * xs[bi, 0, r, hh, p]
            if mo.shape[0] > 0:
                acc += v * _silu(zb[bi, c] * mz[hh, r, p]) * mo[hh, r, p]
            else:
                acc = v * _silu(zb[bi, c])
        y[bi, c] = acc


@nb.njit(fastmath=True, cache=True)
def ssm_stage(counters, stage, t, n_threads, cursor, xs, dts, As, lams, B5, C5, Bb, Cb, ws, dsk, th0, h0, k0, x0,
              th1, h1, k1, zb, mz, mo, y, sc):
    """One task per (row, head), :func:`_head` (one counter stage). sc: this thread's scratch (k, q (R, N), cos,
    sin (S,))."""
    nb_rows, H = xs.shape[0], xs.shape[3]
    G = B5.shape[3]
    k, q, cs, sn = sc
    n_chunks = nb_rows * H
    cursor[0] = 0
    while True:
        task = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if task < 0:
            break
        bi, hh = task // H, task % H
        _head(bi, hh, hh // (H // G), xs, dts, As, lams, B5, C5, Bb, Cb, ws, dsk, th0, h0, k0, x0, th1, h1, k1, zb,
              mz, mo, y, k, q, cs, sn)
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n_chunks, n_threads)


@nb.njit(parallel=True, fastmath=True, cache=True)
def mamba3_stack(h, norm_w, eps, final_w, final_eps, w_in, b_in, dt_b, b_bias, c_bias, bn_w, cn_w, d_skip,
                 m_x, m_z, m_o, consts, w_out, b_out, th0, h0, k0, x0, th1, h1, k1, x1, xn, zb, bc, B5, C5,
                 dts, As, lams, ws, y, out, w_head, b_head, logits, counters, n_threads):
    """One token through a stack of Mamba-3 blocks, h <- h + mamba3_l(rmsnorm_l(h)) for l = 0..L-1, then
    out = final_norm(h) (RMSNorm) and, when w_head (V, d_model) has rows, logits (B, V) = head(out).

    h (B, d_model): the residual stream, updated in place. Per-layer weights are numba typed Lists of L arrays:
    w_in (2 Di + 2 R G N + 3 H + S, d_model), rows (z, x, B, C, dt, A, trap, angles), b_in (rows,) or length 0;
    dt_b, d_skip (H,); b_bias, c_bias (H, R, N); bn_w, cn_w (N,) the B and C RMSNorm weights; m_x, m_z, m_o
    (H, R, P), or length 0 for SISO; w_out (d_model, Di), b_out (d_model,) or length 0. norm_w: block RMSNorm
    weights (d_model,); final_w likewise (length 0 copies h). consts (L, 3): A_floor and the B and C norms'
    epsilons. States (stacked over layers): th (L, B, H, S), h (L, B, H, P, N), k (L, B, R, H, N), x (L, B, R, H,
    P); the new ones go to th1, h1, k1 and x1 (L, B, 1, R, H, P) (the new x state is the step's input x).
    Scratch: xn (B, d_model), zb (B, Di), bc (B, 2 R G N), B5, C5 (B, 1, R, G, N), dts, As, lams (B, 1, H),
    ws (B, 1, H, S), y (B, Di). counters: int64 zeros (counter_slots(STAGES * L + 2, n_threads),).

    Every stage's work happens inside claimed chunks and each shared buffer is rewritten only after a barrier
    that needs every chunk reading it, so a thread that starts late (or never) changes nothing.
    """
    nb_rows = h.shape[0]
    n_layers = len(w_in)
    R, N, S = B5.shape[2], B5.shape[4], ws.shape[3]
    for tu in nb.prange(n_threads):
        t = np.int64(tu)  # one signature for the stage functions (typing sees an int64 index, the gufunc a uint64)
        col = np.empty((_ROWS_LINEAR, nb_rows), dtype=h.dtype)  # this thread's products of a chunk's rows
        cursor = np.zeros(1, dtype=np.int64)
        sc = (np.empty((R, N), dtype=h.dtype), np.empty((R, N), dtype=h.dtype), np.empty(S, dtype=h.dtype),
              np.empty(S, dtype=h.dtype))
        for layer in range(n_layers):
            st = STAGES * layer
            wi, bi, wo, bo = w_in[layer], b_in[layer], w_out[layer], b_out[layer]
            xs = x1[layer]
            _norm_stage(counters, st, n_threads, h, norm_w[layer], eps, xn, True)  # stage 0: the block's norm
            in_proj_stage(counters, st + 1, t, n_threads, cursor, xn, wi, bi, col, zb, xs, bc, dts, As, lams, ws,
                          dt_b[layer], m_x[layer], consts[layer, 0])  # stage 1: in_proj and its elementwise tails
            # stage 2: the B and C RMSNorms
            bc_norm_stage(counters, st + 2, t, n_threads, cursor, bc, bn_w[layer], cn_w[layer], consts[layer, 1],
                          consts[layer, 2], B5, C5)
            # stage 3: the SSM per (row, head), the gate and the MIMO down-projection
            ssm_stage(counters, st + 3, t, n_threads, cursor, xs, dts, As, lams, B5, C5, b_bias[layer],
                      c_bias[layer], ws, d_skip[layer], th0[layer], h0[layer], k0[layer], x0[layer], th1[layer],
                      h1[layer], k1[layer], zb, m_z[layer], m_o[layer], y, sc)
            out_proj_stage(counters, st + 4, t, n_threads, cursor, y, wo, bo, col, h)  # stage 4: out_proj, residual
        last = STAGES * n_layers
        if _claim(counters, last, 0, n_threads) == 0:
            _rms_norm(h, final_w, final_eps, out)
            _finish_stage(counters, last, n_threads)
        _wait_stage(counters, last, 1, n_threads)
        head_stage(counters, last + 1, t, n_threads, cursor, out, w_head, b_head, logits, col)

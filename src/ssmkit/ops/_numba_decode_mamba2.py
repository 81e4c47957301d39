"""Numba kernel for decoding a stack of Mamba-2 (SSD) blocks: one token for a few rows in one parallel launch.

The work sharing (stage counters, chunk claiming, barriers) and the matrix-row products (float, int8, int4) are
those of :mod:`._numba_decode`; this file only adds the Mamba-2 stages. Arrays are C-contiguous; float32 or
float64 throughout (one dtype per call); int8 bytes for quantized weights.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._numba_decode import (
    _ROWS_LINEAR,
    _act_buffers,
    _claim,
    _finish_stage,
    _mark,
    _next_chunk,
    _norm_stage,
    _prep_q,
    _rms_norm,
    _rows_q,
    _rows_stage,
    _silu,
    _wait_stage,
)
from ._numba_kernels import fast_exp, fast_softplus

#: stages per layer (block norm, in_proj + conv + dt, SSD state update, gated norm, out_proj); the kernel
#: needs counter_slots(STAGES * L + 2, threads) counters
STAGES = 5
_ROWS_IN = 32  # in_proj rows per chunk
_CHANNELS = 16  # SSD channels (of headdim * nheads) per chunk
_ROWS_OUT = 16  # out_proj rows per chunk


@nb.njit(fastmath=True, cache=True)
def in_proj_tail(col, lo_, hi_, zb, cw, cb, cs, cn, xbc, dtb, al, dts, lo, hi):
    """in_proj rows lo_..hi_ (products in col (rows, B)) to their uses: z kept in zb, (x, B, C) through the
    causal conv (state cs -> cn) and SiLU into xbc, dt through softplus and the clamp (lo, hi) into dts[:, :H]
    with exp(-dt * exp(A_log)) into dts[:, H:]."""
    nb_rows = zb.shape[0]
    di = zb.shape[1]
    n_conv = xbc.shape[1]
    n_heads = al.shape[0]
    width = cw.shape[1]
    for o in range(lo_, hi_):
        if o < di:
            for b in range(nb_rows):
                zb[b, o] = col[o - lo_, b]
        elif o < di + n_conv:
            c = o - di
            for b in range(nb_rows):
                v = col[o - lo_, b]
                acc = cw[c, width - 1] * v
                for j in range(width - 1):
                    acc += cw[c, j] * cs[b, c, j]
                for j in range(width - 2):
                    cn[b, c, j] = cs[b, c, j + 1]
                if width > 1:
                    cn[b, c, width - 2] = v
                if cb.shape[0] > 0:
                    acc += cb[c]
                xbc[b, c] = _silu(acc)
        else:
            hh = o - di - n_conv
            for b in range(nb_rows):
                dt = min(max(fast_softplus(col[o - lo_, b] + dtb[hh]), lo), hi)
                dts[b, hh] = dt
                dts[b, n_heads + hh] = fast_exp(-dt * fast_exp(al[hh]))


@nb.njit(fastmath=True, cache=True)
def ssd_stage(counters, stage, t, n_threads, cursor, xbc, dts, dsk, ss, sn, zb, y, n_groups):
    """The SSD state update (ss -> sn) and readout per channel, the skip and the gate y = (.) * silu(z), shared
    out in chunks of _CHANNELS channels (one counter stage), then its barrier."""
    n2 = ssd_chunks(counters, stage, t, n_threads, cursor, xbc, dts, dsk, ss, sn, zb, y, n_groups)
    _wait_stage(counters, stage, n2, n_threads)


@nb.njit(fastmath=True, cache=True)
def ssd_chunks(counters, stage, t, n_threads, cursor, xbc, dts, dsk, ss, sn, zb, y, n_groups):
    """:func:`ssd_stage`'s chunks without the barrier; returns the stage's chunk count."""
    nb_rows = zb.shape[0]
    di = zb.shape[1]
    gn = (xbc.shape[1] - di) // 2  # G * N
    n_state = gn // n_groups
    n_heads = dsk.shape[0]
    headdim = di // n_heads
    heads_per_group = n_heads // n_groups
    n2 = (di + _CHANNELS - 1) // _CHANNELS
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n2, t, n_threads, cursor)
        if chunk < 0:
            break
        for c in range(chunk * _CHANNELS, min(di, chunk * _CHANNELS + _CHANNELS)):
            hh = c // headdim
            boff = di + (hh // heads_per_group) * n_state  # this head's B in xbc; its C is gn further
            for b in range(nb_rows):
                xv = xbc[b, c]
                dx = dts[b, hh] * xv
                da = dts[b, n_heads + hh]
                acc = dsk[hh] * xv
                # slices, not xbc[b, boff + n]: numba wraps negative indices, which turns an offset index into a
                # gather (4-5x slower); ordinary stores, not streaming ones, keep the new state in cache
                bv, cv = xbc[b, boff:boff + n_state], xbc[b, boff + gn:boff + gn + n_state]
                s_old, s_new = ss[b, c], sn[b, c]
                for n in range(n_state):
                    sv = s_old[n] * da + dx * bv[n]
                    s_new[n] = sv
                    acc += sv * cv[n]
                y[b, c] = acc * _silu(zb[b, c])
        _finish_stage(counters, stage, n_threads)
    return n2


@nb.njit(fastmath=True, cache=True)
def gated_norm_stage(counters, stage, t, n_threads, cursor, y, gw, geps, n_groups):
    """The gated RMSNorm of y (B, Di) in place, per (row, group) (one counter stage), then its barrier."""
    n3 = gated_norm_chunks(counters, stage, t, n_threads, cursor, y, gw, geps, n_groups)
    _wait_stage(counters, stage, n3, n_threads)


@nb.njit(fastmath=True, cache=True)
def gated_norm_chunks(counters, stage, t, n_threads, cursor, y, gw, geps, n_groups):
    """:func:`gated_norm_stage`'s chunks without the barrier; returns the stage's chunk count."""
    nb_rows = y.shape[0]
    group_size = y.shape[1] // n_groups
    n3 = nb_rows * n_groups
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n3, t, n_threads, cursor)
        if chunk < 0:
            break
        b, g = chunk // n_groups, chunk % n_groups
        c0 = g * group_size
        ms = y[b, c0] * y[b, c0]
        for c in range(c0 + 1, c0 + group_size):
            ms += y[b, c] * y[b, c]
        inv = 1 / math.sqrt(ms / group_size + geps)
        for c in range(c0, c0 + group_size):
            y[b, c] = y[b, c] * inv * gw[c]
        _finish_stage(counters, stage, n_threads)
    return n3


@nb.njit(parallel=True, fastmath=True, cache=True)
def mamba2_stack(h, residual, norm_w, eps, final_w, final_eps, w_in, s_in, b_in, conv_w, conv_b, conv_state,
                 dt_b, a_log, d_skip, gnorm_w, consts, n_groups, w_out, s_out, b_out, ssm_state, conv_new, ssm_new,
                 xn, zb, xbc, dts, y, out, w_head, s_head, b_head, logits, counters, n_threads, act_q, prof):
    """One token through a stack of Mamba-2 blocks, h <- h + mamba2_l(norm_l(h)) for l = 0..L-1, then
    out = final_norm(h) (RMSNorm) and, when w_head (V, d_model) has rows, logits (B, V) = head(out).

    h (B, d_model): the residual stream, updated in place (``residual=False``: each layer's output replaces it).
    Per-layer weights are numba typed Lists of L arrays: w_in (Di + C + H, d_model) with C = Di + 2 G N conv
    channels, rows ordered (z, x, B, C, dt) (float, int8 with per-row scale s_in, or packed int4 with a 2-D
    s_in; s_in length 0 for float); b_in (rows,) or length 0; conv_w (C, K); conv_b (C,) or length 0;
    dt_b, a_log, d_skip (H,); gnorm_w (Di,) the gated RMSNorm weight; w_out (d_model, Di) with s_out, b_out like
    w_in's. norm_w: block RMSNorm weights (d_model,) or length 0 for none; final_w likewise (length 0 copies h).
    consts (L, 3): dt clamp (lo, hi), finite (fast-math assumes no infinities), and the gated norm's
    epsilon per layer. n_groups: G (B and C groups, and the
    gated norm's groups). States: conv (L, B, C, K - 1), ssm (L, B, Di, N) (Di = heads x headdim); the new
    ones go to conv_new / ssm_new. Scratch: xn (B, d_model), zb (B, Di), xbc (B, C), dts (B, 2 H), y (B, Di).
    counters: int64 zeros (counter_slots(STAGES * L + 2, n_threads),). act_q: int8 and int4 weights multiply
    activations quantized per block of 32 (:mod:`._numba_q8`), float weights do not. prof: int64
    (n_threads, 2 (STAGES L + 2) + 1) per-stage clock (:func:`._numba_decode._mark`), or (0, 0) for none.

    Every stage's work happens inside claimed chunks and each shared buffer is rewritten only after a barrier
    that needs every chunk reading it, so a thread that starts late (or never) changes nothing.
    """
    nb_rows = h.shape[0]
    n_layers = len(w_in)
    di = zb.shape[1]
    for t in nb.prange(n_threads):
        col = np.empty((_ROWS_LINEAR, nb_rows), dtype=h.dtype)  # this thread's products of a chunk's rows
        cursor = np.zeros(1, dtype=np.int64)
        qm, qi = _act_buffers(nb_rows, h.shape[1], h), _act_buffers(nb_rows, di, h)  # quantized inputs (act_q)
        _mark(prof, t, 0)
        for layer in range(n_layers):
            st = STAGES * layer
            wi, si, bi = w_in[layer], s_in[layer], b_in[layer]
            cw, cb, cs, cn = conv_w[layer], conv_b[layer], conv_state[layer], conv_new[layer]
            dtb, al, dsk, gw = dt_b[layer], a_log[layer], d_skip[layer], gnorm_w[layer]
            ss, sn = ssm_state[layer], ssm_new[layer]
            wo, so, bo = w_out[layer], s_out[layer], b_out[layer]
            lo, hi, geps = consts[layer, 0], consts[layer, 1], consts[layer, 2]
            _mark(prof, t, 1 + 2 * st)
            _norm_stage(counters, st, n_threads, h, norm_w[layer], eps, xn, residual)  # stage 0: the block's norm
            _mark(prof, t, 2 + 2 * st)
            # stage 1: in_proj; z kept, (x, B, C) through the causal conv and SiLU, dt through softplus and clamp
            _prep_q(xn, act_q, si, qm)
            n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
                if chunk < 0:
                    break
                lo_, hi_ = chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN)
                _rows_q(xn, act_q, qm, wi, lo_, hi_, si, bi, col)
                in_proj_tail(col, lo_, hi_, zb, cw, cb, cs, cn, xbc, dtb, al, dts, lo, hi)
                _finish_stage(counters, st + 1, n_threads)
            _mark(prof, t, 1 + 2 * (st + 1))
            _wait_stage(counters, st + 1, n1, n_threads)
            _mark(prof, t, 2 + 2 * (st + 1))
            # stage 2: the SSD state update and readout per channel, the skip and the gate y * silu(z)
            n2 = ssd_chunks(counters, st + 2, t, n_threads, cursor, xbc, dts, dsk, ss, sn, zb, y, n_groups)
            _mark(prof, t, 1 + 2 * (st + 2))
            _wait_stage(counters, st + 2, n2, n_threads)
            _mark(prof, t, 2 + 2 * (st + 2))
            # stage 3: the gated RMSNorm, one chunk per (row, group)
            n3 = gated_norm_chunks(counters, st + 3, t, n_threads, cursor, y, gw, geps, n_groups)
            _mark(prof, t, 1 + 2 * (st + 3))
            _wait_stage(counters, st + 3, n3, n_threads)
            _mark(prof, t, 2 + 2 * (st + 3))
            # stage 4: out_proj into the residual stream
            _prep_q(y, act_q, so, qi)
            n4 = (wo.shape[0] + _ROWS_OUT - 1) // _ROWS_OUT
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 4, n4, t, n_threads, cursor)
                if chunk < 0:
                    break
                lo_, hi_ = chunk * _ROWS_OUT, min(wo.shape[0], chunk * _ROWS_OUT + _ROWS_OUT)
                _rows_q(y, act_q, qi, wo, lo_, hi_, so, bo, col)
                for o in range(lo_, hi_):
                    for b in range(nb_rows):
                        h[b, o] += col[o - lo_, b]
                _finish_stage(counters, st + 4, n_threads)
            _mark(prof, t, 1 + 2 * (st + 4))
            _wait_stage(counters, st + 4, n4, n_threads)
            _mark(prof, t, 2 + 2 * (st + 4))
        last = STAGES * n_layers
        _mark(prof, t, 1 + 2 * last)
        if _claim(counters, last, 0, n_threads) == 0:
            _rms_norm(h, final_w, final_eps, out)
            _finish_stage(counters, last, n_threads)
        _wait_stage(counters, last, 1, n_threads)
        _mark(prof, t, 2 + 2 * last)
        _prep_q(out, act_q, s_head, qm)
        _rows_stage(out, act_q, qm, w_head, s_head, b_head, logits, counters, last + 1, t, n_threads, col, cursor)
        _mark(prof, t, 3 + 2 * last)
        _mark(prof, t, 4 + 2 * last)

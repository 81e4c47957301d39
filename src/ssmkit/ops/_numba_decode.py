"""Numba kernels for decoding (a few rows at a time): the fused Mamba recurrent step and a row-parallel linear.

Each kernel is one parallel launch: ``prange(n_threads)`` workers share every stage's chunks through the atomic
counters of :mod:`._numba_atomics` and wait for a stage to finish before the next one reads its results. Worker
t first claims chunks of its own contiguous region of a stage, then helps with the others.
Arrays are C-contiguous; float32 or float64 throughout (one dtype per call).

Work sharing lives in :mod:`._numba_workshare`, the row products in :mod:`._numba_rows`; their names are
re-exported here for the kernels of the other families.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._numba_kernels import fast_exp, fast_softplus
from ._numba_rows import (
    _ROWS_LINEAR,
    _act_buffers,
    _prep_q,
    _rows_block,
    _rows_q,
    _rows_stage,
    _rows_times_weight,
)
from ._numba_workshare import _claim, _finish_stage, _mark, _next_chunk, _wait_stage, counter_slots

__all__ = ["_ROWS_LINEAR", "_act_buffers", "_claim", "_finish_stage", "_mark", "_next_chunk", "_norm_stage",
           "_prep_q", "_rms_norm", "_rows_block", "_rows_q", "_rows_stage", "_rows_times_weight", "_silu",
           "_wait_stage", "counter_slots", "exp_of", "linear", "mamba_stack"]

_ROWS_IN = 32  # in_proj rows per chunk
_ROWS_X = 4  # x_proj rows per chunk
_CHANNELS = 64  # scan channels per chunk
_ROWS_OUT = 16  # out_proj rows per chunk


@nb.njit(inline="always", fastmath=True, cache=True)
def _silu(v):
    return v / (1 + fast_exp(-v))


@nb.njit(inline="always", fastmath=True, cache=True)
def _rms_norm(h, w, eps, out):
    """out = h * rsqrt(mean(h^2) + eps) * w per row; a length-0 w copies h."""
    for b in range(h.shape[0]):
        if w.shape[0] == 0:
            for k in range(h.shape[1]):
                out[b, k] = h[b, k]
            continue
        ms = h[b, 0] * h[b, 0]
        for k in range(1, h.shape[1]):
            ms += h[b, k] * h[b, k]
        inv = 1 / math.sqrt(ms / h.shape[1] + eps)
        for k in range(h.shape[1]):
            out[b, k] = h[b, k] * inv * w[k]


@nb.njit(inline="always", fastmath=True, cache=True)
def _norm_stage(counters, stage, n_threads, h, w, eps, xn, residual):
    """A block's norm stage (one chunk: it needs the whole row): the first thread to claim it writes
    xn = rmsnorm(h) and, without a residual, zeroes h; every thread then waits for it."""
    if _claim(counters, stage, 0, n_threads) == 0:
        _rms_norm(h, w, eps, xn)
        if not residual:
            h[:, :] = 0
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, 1, n_threads)


@nb.njit(cache=True)
def exp_of(a):
    """exp(a) elementwise for a 2-D array, with the kernels' exp (:func:`._numba_kernels.fast_exp`): the Mamba
    kernel's exp(A_log), computed once per plan."""
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = fast_exp(a[i, j])
    return out


@nb.njit(inline="always", fastmath=True, cache=True)
def _scan_chunk(c0, c1, b, u, xz, xdbl, wdt, bdt, a_exp, dsk, ss, sn, y, dtv):
    """The selective-scan step of channels [c0, c1) of row b: dt = softplus(b_dt + w_dt . dt_low), the state
    update sn = ss * exp(-dt a_exp) + dt u B, the readout (sn . C + d u) and the gate silu(z) into y. Each part
    runs as its own loop over the chunk (dt and gate through dtv (2, >= c1 - c0)), so the exponentials and the
    state update vectorise: fused per channel, the 16-wide state loop and the reductions did not."""
    di = u.shape[1]
    rank, n_state = wdt.shape[1], a_exp.shape[1]
    for c in range(c0, c1):
        dv = bdt[c]
        for r in range(rank):
            dv += wdt[c, r] * xdbl[b, r]
        dtv[0, c - c0] = dv
    for i in range(c1 - c0):
        dtv[0, i] = fast_softplus(dtv[0, i])
        dtv[1, i] = _silu(xz[b, di + c0 + i])
    if n_state == 16:  # the usual size: one fused pass per channel over a constant 16 (1.15x on this stage)
        for c in range(c0, c1):
            dt = dtv[0, c - c0]
            du = dt * u[b, c]
            acc = dsk[c] * u[b, c]
            for n in range(16):
                v = ss[b, c, n] * fast_exp(-dt * a_exp[c, n]) + du * xdbl[b, rank + n]
                sn[b, c, n] = v
                acc += v * xdbl[b, rank + 16 + n]
            y[b, c] = acc * dtv[1, c - c0]
        return
    for c in range(c0, c1):
        dt = dtv[0, c - c0]
        du = dt * u[b, c]
        for n in range(n_state):
            sn[b, c, n] = ss[b, c, n] * fast_exp(-dt * a_exp[c, n]) + du * xdbl[b, rank + n]
    for c in range(c0, c1):
        acc = dsk[c] * u[b, c]
        for n in range(n_state):
            acc += sn[b, c, n] * xdbl[b, rank + n_state + n]
        y[b, c] = acc * dtv[1, c - c0]


@nb.njit(parallel=True, fastmath=True, cache=True)
def mamba_stack(h, residual, norm_w, eps, final_w, final_eps, w_in, s_in, b_in, conv_w, conv_b, conv_state, w_x, s_x,
                w_dt, b_dt, a_exp, d_skip, w_out, s_out, b_out, ssm_state, conv_new, ssm_new, xn, xz, u, xdbl, y,
                out, w_head, s_head, b_head, logits, counters, n_threads, act_q, prof):
    """One token through a stack of Mamba blocks, h <- h + mamba_l(norm_l(h)) for l = 0..L-1, then
    out = final_norm(h) (RMSNorm) and, when w_head (V, d_model) has rows, logits (B, V) = head(out) (float or
    int8 with s_head; b_head may have length 0): the LM head in the same launch. Per-layer weights are numba
    typed Lists of L arrays (a tuple of arrays indexed at run time makes LLVM compile a switch per access, which
    takes minutes); states are stacked over layers. prof: int64 (n_threads, 2 (5 L + 2) + 1) per-stage clock
    (:func:`_mark`), or (0, 0) for none.

    h (B, d_model) is the residual stream, updated in place; with ``residual=False`` (a single mixer, no
    block) each layer's output replaces h instead of adding to it. norm_w / final_w: RMSNorm weights (d_model,) or
    length 0 for no norm (the block's input is h itself); final_w of length 0 copies h to out. Layer weights:
    w_in (2 Di, d_model), w_x (R + 2N, Di), w_dt (Di, R), w_out (d_model, Di), conv_w (Di, K): float, or int8
    with per-row scales s_in / s_x / s_out (length 0 for float); biases b_in (2 Di,), conv_b (Di,),
    b_out (d_model,) may have length 0; b_dt (Di,); a_exp (Di, N) = exp(A_log) (:func:`exp_of`); d_skip (Di,).
    States conv (L, B, Di, K - 1), ssm (L, B, Di, N); the new ones go to conv_new / ssm_new. Scratch:
    xn (B, d_model), xz (B, 2 Di), u (B, Di), xdbl (B, R + 2N), y (B, Di). counters: int64 zeros
    (counter_slots(5 L + 2, n_threads),). act_q: the int8 and int4 weights multiply activations quantized per
    block of 32 (:mod:`._numba_q8`), float weights do not.

    All work happens inside claimed chunks and every shared buffer is rewritten only after a stage barrier
    that needs every chunk reading it, so a thread that starts late (or never) changes nothing.
    """
    nb_rows, d_model = h.shape
    n_layers = len(w_in)
    di = u.shape[1]
    for t in nb.prange(n_threads):
        col = np.empty((_ROWS_LINEAR, nb_rows), dtype=h.dtype)  # this thread's products of a chunk's rows
        cursor = np.zeros(1, dtype=np.int64)
        dtv = np.empty((2, _CHANNELS), dtype=h.dtype)  # a scan chunk's dt and gate
        qm, qi = _act_buffers(nb_rows, d_model, h), _act_buffers(nb_rows, di, h)  # quantized inputs (act_q)
        _mark(prof, t, 0)
        for layer in range(n_layers):
            st = 5 * layer
            wi, si, bi = w_in[layer], s_in[layer], b_in[layer]
            cw, cb, cs, cn = conv_w[layer], conv_b[layer], conv_state[layer], conv_new[layer]
            wx, sx, wdt, bdt = w_x[layer], s_x[layer], w_dt[layer], b_dt[layer]
            ae, dsk, ss, sn = a_exp[layer], d_skip[layer], ssm_state[layer], ssm_new[layer]
            wo, so, bo, nw = w_out[layer], s_out[layer], b_out[layer], norm_w[layer]
            width = cw.shape[1]
            _mark(prof, t, 1 + 2 * st)
            _norm_stage(counters, st, n_threads, h, nw, eps, xn, residual)  # stage 0: the block's norm
            _mark(prof, t, 2 + 2 * st)
            # stage 1: in_proj; the x half goes straight through the causal conv and SiLU
            _prep_q(xn, act_q, si, qm)
            n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
                if chunk < 0:
                    break
                lo, hi = chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN)
                _rows_q(xn, act_q, qm, wi, lo, hi, si, bi, col)
                for o in range(lo, hi):
                    for b in range(nb_rows):
                        v = col[o - lo, b]
                        xz[b, o] = v
                        if o < di:
                            acc = cw[o, width - 1] * v
                            for j in range(width - 1):
                                acc += cw[o, j] * cs[b, o, j]
                            for j in range(width - 2):
                                cn[b, o, j] = cs[b, o, j + 1]
                            if width > 1:
                                cn[b, o, width - 2] = v
                            if cb.shape[0] > 0:
                                acc += cb[o]
                            u[b, o] = _silu(acc)
                _finish_stage(counters, st + 1, n_threads)
            _mark(prof, t, 1 + 2 * (st + 1))
            _wait_stage(counters, st + 1, n1, n_threads)
            _mark(prof, t, 2 + 2 * (st + 1))
            # stage 2: x_proj -> (dt_low, B, C)
            _prep_q(u, act_q, sx, qi)
            n2 = (wx.shape[0] + _ROWS_X - 1) // _ROWS_X
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 2, n2, t, n_threads, cursor)
                if chunk < 0:
                    break
                lo, hi = chunk * _ROWS_X, min(wx.shape[0], chunk * _ROWS_X + _ROWS_X)
                _rows_q(u, act_q, qi, wx, lo, hi, sx, bdt[:0], col)
                for r in range(lo, hi):
                    for b in range(nb_rows):
                        xdbl[b, r] = col[r - lo, b]
                _finish_stage(counters, st + 2, n_threads)
            _mark(prof, t, 1 + 2 * (st + 2))
            _wait_stage(counters, st + 2, n2, n_threads)
            _mark(prof, t, 2 + 2 * (st + 2))
            # stage 3: dt = softplus(dt_proj(dt_low)), state update, readout, skip and gate
            n3 = (di + _CHANNELS - 1) // _CHANNELS
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 3, n3, t, n_threads, cursor)
                if chunk < 0:
                    break
                for b in range(nb_rows):
                    _scan_chunk(chunk * _CHANNELS, min(di, chunk * _CHANNELS + _CHANNELS), b, u, xz, xdbl, wdt, bdt,
                                ae, dsk, ss, sn, y, dtv)
                _finish_stage(counters, st + 3, n_threads)
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
                lo, hi = chunk * _ROWS_OUT, min(wo.shape[0], chunk * _ROWS_OUT + _ROWS_OUT)
                _rows_q(y, act_q, qi, wo, lo, hi, so, bo, col)
                for o in range(lo, hi):
                    for b in range(nb_rows):
                        h[b, o] += col[o - lo, b]
                _finish_stage(counters, st + 4, n_threads)
            _mark(prof, t, 1 + 2 * (st + 4))
            _wait_stage(counters, st + 4, n4, n_threads)
            _mark(prof, t, 2 + 2 * (st + 4))
        last = 5 * n_layers
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


@nb.njit(parallel=True, fastmath=True, cache=True)
def linear(x, w, scale, bias, out, counters, n_threads, act_q):
    """out[b, o] = sum_k x[b, k] w[o, k] (* scale[o]) (+ bias[o]); x (B, K), w (O, K) float or int8 (or packed
    int4 with a 2-D scale), out (B, O); scale and bias of length 0 mean none; act_q: quantized weights multiply
    x quantized per block of 32 (:mod:`._numba_q8`). counters: int64 zeros (counter_slots(1, n_threads),)."""
    for t in nb.prange(n_threads):
        col = np.empty((_ROWS_LINEAR, x.shape[0]), dtype=out.dtype)
        cursor = np.zeros(1, dtype=np.int64)
        qbuf = _act_buffers(x.shape[0], x.shape[1], x)
        _prep_q(x, act_q, scale, qbuf)
        _rows_stage(x, act_q, qbuf, w, scale, bias, out, counters, 0, t, n_threads, col, cursor)

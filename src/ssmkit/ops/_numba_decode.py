"""Numba kernels for decoding (a few rows at a time): the fused Mamba recurrent step and a row-parallel linear.

Each kernel is one parallel launch: ``prange(n_threads)`` workers share every stage's chunks through the atomic
counters of :mod:`._numba_atomics` and wait for a stage to finish before the next one reads its results. Worker
t first claims chunks of its own contiguous region of a stage, then helps with the others.
Arrays are C-contiguous; float32 or float64 throughout (one dtype per call).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

from ._numba_atomics import atomic_add, atomic_load, cpu_relax, cycle_counter, thread_yield
from ._numba_kernels import fast_exp, fast_softplus
from ._numba_q4 import int4_group_ok, pack_acts, rows_int4
from ._numba_q8 import QBLOCK, STEP, pack_acts8, quantize_rows, rows_int8

_PAD = 8  # int64 slots per counter: each counter owns a 64-byte cache line (no false sharing between threads)
_SPINS = 64  # pause-spins of a stage wait before it starts yielding the core


def counter_slots(n_stages: int, n_threads: int) -> int:
    """Length of a kernel's int64 counters array: per stage, a claim counter per thread's region and a done counter
    (the linear kernel has 1 stage, mamba_stack 5 per layer + 2), each on its own 64-byte line."""
    return n_stages * (n_threads + 1) * _PAD


@nb.njit(inline="always", cache=True)
def _slot(stage, index, n_threads):
    """The counters index of counter ``index`` (a region, or n_threads for the done counter) of ``stage``."""
    return (stage * (n_threads + 1) + index) * _PAD

_ROWS_IN = 32  # in_proj rows per chunk
_ROWS_X = 4  # x_proj rows per chunk
_CHANNELS = 64  # scan channels per chunk
_ROWS_OUT = 16  # out_proj rows per chunk
_ROWS_LINEAR = 64  # rows per chunk of the plain linear kernel


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


@nb.njit(inline="always", cache=True)
def _claim(counters, stage, region, n_threads):
    """The next unclaimed chunk of ``region`` of ``stage``, counted from the region's start."""
    return atomic_add(counters, _slot(stage, region, n_threads), 1)


@nb.njit(inline="always", cache=True)
def _region(n_chunks, region, n_threads):
    """Chunks [lo, hi) of ``region``: thread t first takes chunks from region t (a contiguous share, which the
    hardware prefetcher streams well), then helps with the other regions."""
    return region * n_chunks // n_threads, (region + 1) * n_chunks // n_threads


@nb.njit(inline="always", cache=True)
def _next_chunk(counters, stage, n_chunks, t, n_threads, cursor):
    """The next chunk of ``stage`` for thread t, or -1 when every chunk is claimed. ``cursor[0]`` (set to 0 before
    a stage) counts the regions this thread has emptied: its own first, then the next ones."""
    while cursor[0] < n_threads:
        region = (t + cursor[0]) % n_threads
        lo, hi = _region(n_chunks, region, n_threads)
        chunk = lo + _claim(counters, stage, region, n_threads)
        if chunk < hi:
            return chunk
        cursor[0] += 1
    return -1


@nb.njit(inline="always", cache=True)
def _finish_stage(counters, stage, n_threads):
    """Count one finished chunk of ``stage``: a seq_cst fetch-add, which releases the chunk's stores (the memory
    ordering argument is in :mod:`._numba_atomics`)."""
    atomic_add(counters, _slot(stage, n_threads, n_threads), 1)


@nb.njit(inline="always", cache=True)
def _wait_stage(counters, stage, n_chunks, n_threads):
    """Return once all ``n_chunks`` chunks of ``stage`` are done. The acquire load of the done counter makes every
    counted chunk's stores visible here. Spins with ``pause`` for _SPINS rounds (a stage usually ends within
    microseconds), then yields the core each round, so a waiter does not starve a descheduled thread it waits
    for on a busy machine."""
    spins = 0
    while atomic_load(counters, _slot(stage, n_threads, n_threads)) < n_chunks:
        if spins < _SPINS:
            cpu_relax()
            spins += 1
        else:
            thread_yield()


@nb.njit(inline="always", cache=True)
def _mark(prof, t, i):
    """With a profile array (n_threads, 2 stages + 1) of nonzero length, prof[t, i] = the cycle counter: the
    kernels mark their start (i = 0) and each stage's barrier, entered (1 + 2 s) and left (2 + 2 s); ticks per
    second: :func:`counter_hz`."""
    if prof.shape[0] > 0:
        prof[t, i] = cycle_counter()


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

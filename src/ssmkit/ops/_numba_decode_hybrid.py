"""Numba kernel for decoding a hybrid stack (Mamba-2, grouped-query attention with a KV cache, and MLP blocks)
for a few rows in one parallel launch, with the final norm and the LM head.

The work sharing (stage counters, chunk claiming, barriers) and the matrix-row products are those of
:mod:`._numba_decode`; the Mamba-2 stages are :mod:`._numba_decode_mamba2`'s. Arrays are C-contiguous, float32
or float64 throughout (one dtype per call, float weights only).
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
    _silu,
    _wait_stage,
)
from ._numba_decode_mamba2 import gated_norm_stage, in_proj_tail, ssd_stage
from ._numba_kernels import fast_exp
from ._numba_rowblock import rows_blocked

#: block kinds of the program
MAMBA2, FFN, GQA = 0, 1, 2
#: feed-forward activation codes (:data:`ssmkit.layers.ffn.ACTIVATIONS` names)
ACTS = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3, "relu2": 4}
#: counter stages per block; the kernel needs counter_slots(STAGES * L + 2, threads) counters
STAGES = 5
_ROWS_IN = 32  # projection rows per chunk
_ROWS_OUT = 16  # output-projection rows per chunk


@nb.njit(fastmath=True, cache=True)
def _rows(x, w, lo, hi, bias, buf):
    """buf[o - lo, b] = x[b] . w[o] + bias[o] (float weights; one compiled copy shared by every stage; 4 x 4
    register blocks from two rows of x on, :func:`._numba_rowblock.rows_blocked`)."""
    rows_blocked(x, w, lo, hi, bias, buf)


@nb.njit(inline="always", fastmath=True, cache=True)
def _act(v, code):
    if code == 0:
        return _silu(v)
    if code == 1:
        return 0.5 * v * (1 + math.erf(v * 0.7071067811865476))
    if code == 2:
        return 0.5 * v * (1 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    r = max(v, v - v)
    return r if code == 3 else r * r


@nb.njit(fastmath=True, cache=True)
def _rows_into_h(x, w, bias, h, mult, counters, stage, t, n_threads, col, cursor):
    """h[:, o] += mult * (x @ w[o] + bias[o]) for every row o of w, shared by the threads, then a barrier."""
    n_chunks = (w.shape[0] + _ROWS_OUT - 1) // _ROWS_OUT
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_OUT, min(w.shape[0], chunk * _ROWS_OUT + _ROWS_OUT)
        _rows(x, w, lo, hi, bias, col)
        for o in range(lo, hi):
            for b in range(x.shape[0]):
                h[b, o] += mult * col[o - lo, b]
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n_chunks, n_threads)


@nb.njit(fastmath=True, cache=True)
def _rows_into(x, w, bias, out, counters, stage, t, n_threads, col, cursor):
    """out[:, o] = x @ w[o] + bias[o] for every row o of w, shared by the threads, then a barrier."""
    n_chunks = (w.shape[0] + _ROWS_IN - 1) // _ROWS_IN
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_IN, min(w.shape[0], chunk * _ROWS_IN + _ROWS_IN)
        _rows(x, w, lo, hi, bias, col)
        for o in range(lo, hi):
            for b in range(x.shape[0]):
                out[b, o] = col[o - lo, b]
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n_chunks, n_threads)


@nb.njit(fastmath=True, cache=True)
def _mamba2_block(st, t, n_threads, counters, cursor, col, h, xn, mult, wi, bi, cw, cb, cs, cn, dtb, al, dsk, gw,
                  lo, hi, geps, n_groups, wo, bo, ss, sn, zb, xbc, dts, y):
    """A Mamba-2 block after its norm (xn): in_proj, conv, SSD step, gated norm, out_proj into h (stages
    st + 1 .. st + 4); the stages after in_proj's products are :mod:`._numba_decode_mamba2`'s."""
    n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
        if chunk < 0:
            break
        lo_, hi_ = chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN)
        _rows(xn, wi, lo_, hi_, bi, col)
        in_proj_tail(col, lo_, hi_, zb, cw, cb, cs, cn, xbc, dtb, al, dts, lo, hi)
        _finish_stage(counters, st + 1, n_threads)
    _wait_stage(counters, st + 1, n1, n_threads)
    ssd_stage(counters, st + 2, t, n_threads, cursor, xbc, dts, dsk, ss, sn, zb, y, n_groups)
    gated_norm_stage(counters, st + 3, t, n_threads, cursor, y, gw, geps, n_groups)
    _rows_into_h(y, wo, bo, h, mult, counters, st + 4, t, n_threads, col, cursor)


@nb.njit(fastmath=True, cache=True)
def _ffn_block(st, t, n_threads, counters, cursor, col, col2, h, xn, mult, wu, bu, wg, bg, wd, bd, code, gmul, dmul,
               hid):
    """An MLP block after its norm: hid = act(gate(xn) * gmul) * up(xn) (or act(up(xn)) ungated), then
    h += mult * dmul * down(hid) (stages st + 1, st + 2)."""
    nb_rows = h.shape[0]
    n1 = (wu.shape[0] + _ROWS_IN - 1) // _ROWS_IN
    gated = wg.shape[0] > 0
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_IN, min(wu.shape[0], chunk * _ROWS_IN + _ROWS_IN)
        _rows(xn, wu, lo, hi, bu, col)
        if gated:
            _rows(xn, wg, lo, hi, bg, col2)
            for o in range(lo, hi):
                for b in range(nb_rows):
                    hid[b * wu.shape[0] + o] = _act(col2[o - lo, b] * gmul, code) * col[o - lo, b]
        else:
            for o in range(lo, hi):
                for b in range(nb_rows):
                    hid[b * wu.shape[0] + o] = _act(col[o - lo, b], code)
        _finish_stage(counters, st + 1, n_threads)
    _wait_stage(counters, st + 1, n1, n_threads)
    x = hid[:nb_rows * wu.shape[0]].reshape((nb_rows, wu.shape[0]))  # C-contiguous (a 2-D slice would not be)
    _rows_into_h(x, wd, bd, h, mult * dmul, counters, st + 2, t, n_threads, col, cursor)


@nb.njit(inline="always", fastmath=True, cache=True)
def _rotate(x, off, inv_freq, pos):
    """Rotate x[off : off + rotary_dim] in place: pairs (j, j + rotary_dim / 2) by pos * inv_freq[j] (pos in
    x's dtype, so float32 angles round as GQAttention's do)."""
    half = inv_freq.shape[0]
    for j in range(half):
        ang = pos * inv_freq[j]
        c, s = math.cos(ang), math.sin(ang)
        a, b = x[off + j], x[off + half + j]
        x[off + j] = a * c - b * s
        x[off + half + j] = b * c + a * s


@nb.njit(fastmath=True, cache=True)
def _gqa_block(st, t, n_threads, counters, cursor, col, h, xn, mult, wqkv, bqkv, wo, bo, inv_freq, scale, kmul,
               n_heads, n_kv, kb, vb, slot, row_lo, pos, qkv, att, scores, qv, acc):
    """An attention block after its norm: q, k, v = projections of xn (k times kmul), rotated at pos[b]; the new
    k, v go to cache slot ``slot`` of kb / vb (B, n_kv, cap, D); row b attends to slots [row_lo[b], slot]; then
    h += mult * o_proj(att) (stages st + 1 .. st + 3)."""
    nb_rows = h.shape[0]
    d = kb.shape[3]
    dq = n_heads * d
    rep = n_heads // n_kv
    _rows_into(xn, wqkv, bqkv, qkv, counters, st + 1, t, n_threads, col, cursor)
    n2 = nb_rows * n_kv
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, st + 2, n2, t, n_threads, cursor)
        if chunk < 0:
            break
        b, g = chunk // n_kv, chunk % n_kv
        p = pos[b]
        koff = dq + g * d
        voff = dq + n_kv * d + g * d
        for i in range(d):
            qkv[b, koff + i] *= kmul
        if inv_freq.shape[0] > 0:
            _rotate(qkv[b], koff, inv_freq, p)
        for i in range(d):
            kb[b, g, slot, i] = qkv[b, koff + i]
            vb[b, g, slot, i] = qkv[b, voff + i]
        first = row_lo[b]
        count = slot + 1 - first
        for r in range(rep):  # the group's query heads together: each cached key and value is read once
            qoff = (g * rep + r) * d
            if inv_freq.shape[0] > 0:
                _rotate(qkv[b], qoff, inv_freq, p)
            for i in range(d):
                qv[r, i] = qkv[b, qoff + i] * scale
                acc[r, i] = 0
        # scores[r, j] = q_r . k_j: the cached keys as the rows of x, the group's queries as weight rows
        rows_blocked(kb[b, g, first:slot + 1], qv, 0, rep, kb[b, g, 0, :0], scores)
        for r in range(rep):
            sr = scores[r, :count]
            m = sr[0]  # fast math assumes finite values: no -inf start
            for j in range(1, count):
                m = max(m, sr[j])
            tot = m - m
            for j in range(count):  # a flat loop over contiguous scores: float32's exp vectorises
                e = fast_exp(sr[j] - m)
                sr[j] = e
                tot += e
            inv = 1 / tot
            for j in range(count):
                sr[j] *= inv
        for j in range(count):
            vj = vb[b, g, first + j]
            for r in range(rep):
                e = scores[r, j]
                for i in range(d):
                    acc[r, i] += e * vj[i]
        for r in range(rep):
            qoff = (g * rep + r) * d
            for i in range(d):
                att[b, qoff + i] = acc[r, i]
        _finish_stage(counters, st + 2, n_threads)
    _wait_stage(counters, st + 2, n2, n_threads)
    _rows_into_h(att, wo, bo, h, mult, counters, st + 3, t, n_threads, col, cursor)


@nb.njit(inline="always", fastmath=True, cache=True)
def final_head(last, t, n_threads, counters, cursor, h, final_w, final_eps, final_div, out, w_head, b_head, col,
               logits):
    """The last two stages of a hybrid launch (one per thread t): stage ``last``, the final RMSNorm of h (rows, D)
    into out, divided by final_div; stage last + 1, logits (rows, V) = out . w_head + b_head in shared chunks."""
    n_rows = h.shape[0]
    if _claim(counters, last, 0, n_threads) == 0:
        _rms_norm(h, final_w, final_eps, out)
        if final_div != 1:
            for r in range(n_rows):
                for j in range(out.shape[1]):
                    out[r, j] = out[r, j] / final_div
        _finish_stage(counters, last, n_threads)
    _wait_stage(counters, last, 1, n_threads)
    n_chunks = (w_head.shape[0] + _ROWS_LINEAR - 1) // _ROWS_LINEAR
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, last + 1, n_chunks, t, n_threads, cursor)
        if chunk < 0:
            break
        lo, hi = chunk * _ROWS_LINEAR, min(w_head.shape[0], chunk * _ROWS_LINEAR + _ROWS_LINEAR)
        _rows(out, w_head, lo, hi, b_head, col)
        for o in range(lo, hi):
            for r in range(n_rows):
                logits[r, o] = col[o - lo, r]


@nb.njit(parallel=True, fastmath=True, cache=True)
def hybrid_stack(h, kinds, index, norm_w, norm_eps, res_mult, final_w, final_eps, final_div,
                 m_in_w, m_in_b, m_conv_w, m_conv_b, m_dt_b, m_a_log, m_d, m_gnorm_w, m_consts, n_groups, m_out_w,
                 m_out_b, conv_state, ssm_state, conv_new, ssm_new,
                 f_up_w, f_up_b, f_gate_w, f_gate_b, f_down_w, f_down_b, f_acts, f_consts,
                 a_qkv_w, a_qkv_b, a_o_w, a_o_b, a_inv_freq, a_consts, n_heads, n_kv, k_buf, v_buf, slot, row_lo, pos,
                 xn, zb, xbc, dts, y, hid, qkv, att, out, w_head, b_head, logits, counters, n_threads):
    """One token through a stack of pre-RMSNorm residual blocks, h <- h + res_mult[l] * block_l(norm_l(h)), then
    out = final_norm(h) / final_div and, when w_head (V, d_model) has rows, logits (B, V) = out @ w_head^T + b_head.

    h (B, d_model): the residual stream, updated in place. kinds (L,): MAMBA2, FFN or GQA; index (L,): the block's
    position in its kind's lists. norm_w: (L, d_model) block norm weights; norm_eps, res_mult (L,).
    Mamba-2 (lists over its blocks, as :func:`._numba_decode_mamba2.mamba2_stack` takes them, float weights):
    m_consts (n, 3) dt clamp (lo, hi) and the gated norm's eps; states conv (n, B, C, K - 1), ssm (n, B, Di, N),
    new ones to conv_new / ssm_new. MLP: up (F, d_model), gate (F, d_model) or (0, d_model) ungated, down
    (d_model, F), biases or length 0; f_acts (n,) codes of :data:`ACTS`; f_consts (n, 2) gate and down multipliers.
    Attention: qkv (n_heads D + 2 n_kv D, d_model) stacked q, k, v projections and bias; o (d_model, n_heads D);
    a_inv_freq (n, rotary_dim / 2) (width 0: no rotary); a_consts (n, 2) softmax scale and key multiplier; KV
    buffers (n, B, n_kv, cap, D), the new key/value written at ``slot``, row b attending to [row_lo[b], slot] at
    rotary position pos[b]. Scratch: xn (B, d_model), zb / y (B, Di), xbc (B, C), dts (B, 2 H), hid (B * max F,),
    qkv (B, n_heads D + 2 n_kv D), att (B, n_heads D). counters: int64 zeros.
    """
    nb_rows = h.shape[0]
    n_layers = kinds.shape[0]
    cap = k_buf.shape[3]
    for t in nb.prange(n_threads):
        col = np.empty((_ROWS_LINEAR, nb_rows), dtype=h.dtype)
        col2 = np.empty((_ROWS_LINEAR, nb_rows), dtype=h.dtype)
        rep = n_heads // n_kv
        scores = np.empty((rep, cap + 1), dtype=h.dtype)
        qv = np.empty((rep, k_buf.shape[4]), dtype=h.dtype)
        acc = np.empty((rep, k_buf.shape[4]), dtype=h.dtype)
        cursor = np.zeros(1, dtype=np.int64)
        for layer in range(n_layers):
            st = STAGES * layer
            _norm_stage(counters, st, n_threads, h, norm_w[layer], norm_eps[layer], xn, True)
            k, i = kinds[layer], index[layer]
            mult = res_mult[layer]
            if k == MAMBA2:
                _mamba2_block(st, t, n_threads, counters, cursor, col, h, xn, mult, m_in_w[i], m_in_b[i],
                              m_conv_w[i], m_conv_b[i], conv_state[i], conv_new[i], m_dt_b[i], m_a_log[i], m_d[i],
                              m_gnorm_w[i], m_consts[i, 0], m_consts[i, 1], m_consts[i, 2], n_groups, m_out_w[i],
                              m_out_b[i], ssm_state[i], ssm_new[i], zb, xbc, dts, y)
            elif k == FFN:
                _ffn_block(st, t, n_threads, counters, cursor, col, col2, h, xn, mult, f_up_w[i], f_up_b[i],
                           f_gate_w[i], f_gate_b[i], f_down_w[i], f_down_b[i], f_acts[i], f_consts[i, 0],
                           f_consts[i, 1], hid)
            else:
                _gqa_block(st, t, n_threads, counters, cursor, col, h, xn, mult, a_qkv_w[i], a_qkv_b[i], a_o_w[i],
                           a_o_b[i], a_inv_freq[i], a_consts[i, 0], a_consts[i, 1], n_heads, n_kv, k_buf[i],
                           v_buf[i], slot, row_lo, pos, qkv, att, scores, qv, acc)
        final_head(STAGES * n_layers, t, n_threads, counters, cursor, h, final_w, final_eps, final_div, out, w_head,
                   b_head, col, logits)

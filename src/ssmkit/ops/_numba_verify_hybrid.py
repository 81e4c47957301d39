"""Numba kernels for a hybrid stack's speculative verify pass: T new tokens per row through Mamba-2, grouped-query
attention and MLP blocks in one parallel launch, and the rollback to each row's accepted length.

:func:`verify_stack` is :func:`._numba_decode_hybrid.hybrid_stack` with B * T rows (row r = b * T + i: row b's
i-th new token): every projection takes all rows at once (4 x 4 register blocks, :mod:`._numba_rowblock`), so each
weight is read once for the whole pass; the causal conv and the SSD recurrence run over each row's T positions in
order; attention position i of row b sees its row's cache and new positions 0..i. Nothing of the models' states
changes: the pass keeps each Mamba-2 layer's per-position conv inputs, (x, B, C) and dt, and the new keys and values
go to the KV buffers past each row's length. :func:`rollback` then advances the Mamba-2 states through each row's
first keep[b] positions (recomputed from those inputs; the attention rollback is the caller's length update).
Float weights only; arrays C-contiguous, one float dtype per call.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._numba_decode import _ROWS_LINEAR, _finish_stage, _next_chunk, _norm_stage, _silu, _wait_stage
from ._numba_decode_hybrid import FFN, MAMBA2, STAGES, _ffn_block, _rotate, _rows, _rows_into, _rows_into_h, final_head
from ._numba_decode_mamba2 import gated_norm_stage
from ._numba_kernels import fast_exp, fast_softplus
from ._numba_rowblock import rows_blocked

_ROWS_IN = 32  # in_proj rows per chunk
_CHANNELS = 16  # SSD channels per chunk


@nb.njit(fastmath=True, cache=True)
def _in_proj_seq(col, lo_, hi_, n_pos, zb, cw, cb, cs, raw, xbc, dtb, al, dts, lo, hi):
    """in_proj rows lo_..hi_ (products in col (rows, B T)) to their uses: z to zb, the raw conv inputs to raw,
    (x, B, C) through the causal conv over each row's positions (its state cs (B, C, K - 1) first) and SiLU into
    xbc, dt through softplus and the clamp (lo, hi) into dts[:, :H], exp(-dt exp(A_log)) into dts[:, H:]."""
    n_rows = zb.shape[0]
    di = zb.shape[1]
    n_conv = xbc.shape[1]
    n_heads = al.shape[0]
    width = cw.shape[1]
    for o in range(lo_, hi_):
        if o < di:
            for r in range(n_rows):
                zb[r, o] = col[o - lo_, r]
        elif o < di + n_conv:
            c = o - di
            for r in range(n_rows):
                raw[r, c] = col[o - lo_, r]
            for r in range(n_rows):
                b, i = r // n_pos, r % n_pos
                acc = cw[c, width - 1] * raw[r, c]
                for j in range(width - 1):  # window entry j of position i: state entry i + j, else new input
                    at = i + j
                    v = cs[b, c, at] if at < width - 1 else raw[b * n_pos + at - (width - 1), c]
                    acc += cw[c, j] * v
                if cb.shape[0] > 0:
                    acc += cb[c]
                xbc[r, c] = _silu(acc)
        else:
            hh = o - di - n_conv
            for r in range(n_rows):
                dt = min(max(fast_softplus(col[o - lo_, r] + dtb[hh]), lo), hi)
                dts[r, hh] = dt
                dts[r, n_heads + hh] = fast_exp(-dt * fast_exp(al[hh]))


@nb.njit(fastmath=True, cache=True)
def _ssd_seq(counters, stage, t, n_threads, cursor, n_pos, xbc, dts, dsk, ss, zb, y, n_groups, sbuf):
    """The SSD recurrence over each row's positions from its state ss (B, Di, N) (not written: the state lives in
    sbuf), readout, skip and gate y = (.) * silu(z), in chunks of channels, then a barrier."""
    n_rows = zb.shape[0]
    di = zb.shape[1]
    gn = (xbc.shape[1] - di) // 2
    n_state = gn // n_groups
    n_heads = dsk.shape[0]
    headdim = di // n_heads
    per_group = n_heads // n_groups
    n2 = (di + _CHANNELS - 1) // _CHANNELS
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, stage, n2, t, n_threads, cursor)
        if chunk < 0:
            break
        for c in range(chunk * _CHANNELS, min(di, chunk * _CHANNELS + _CHANNELS)):
            hh = c // headdim
            boff = di + (hh // per_group) * n_state
            for b in range(n_rows // n_pos):
                for n in range(n_state):
                    sbuf[n] = ss[b, c, n]
                for r in range(b * n_pos, b * n_pos + n_pos):
                    xr = xbc[r]
                    xv = xr[c]
                    dx = dts[r, hh] * xv
                    da = dts[r, n_heads + hh]
                    bv, cv = xr[boff:boff + n_state], xr[boff + gn:boff + gn + n_state]  # 1-D views: vectorises
                    part = xv - xv
                    for n in range(n_state):
                        sv = sbuf[n] * da + dx * bv[n]
                        sbuf[n] = sv
                        part += sv * cv[n]
                    y[r, c] = (part + dsk[hh] * xv) * _silu(zb[r, c])
        _finish_stage(counters, stage, n_threads)
    _wait_stage(counters, stage, n2, n_threads)


@nb.njit(fastmath=True, cache=True)
def _mamba2_seq(st, t, n_threads, counters, cursor, col, h, xn, mult, n_pos, wi, bi, cw, cb, cs, dtb, al, dsk, gw,
                lo, hi, geps, n_groups, wo, bo, ss, raw, zb, xbc, dts, y, sbuf):
    """A Mamba-2 block after its norm over B * T rows (stages st + 1 .. st + 4)."""
    n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
        if chunk < 0:
            break
        lo_, hi_ = chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN)
        _rows(xn, wi, lo_, hi_, bi, col)
        _in_proj_seq(col, lo_, hi_, n_pos, zb, cw, cb, cs, raw, xbc, dtb, al, dts, lo, hi)
        _finish_stage(counters, st + 1, n_threads)
    _wait_stage(counters, st + 1, n1, n_threads)
    _ssd_seq(counters, st + 2, t, n_threads, cursor, n_pos, xbc, dts, dsk, ss, zb, y, n_groups, sbuf)
    gated_norm_stage(counters, st + 3, t, n_threads, cursor, y, gw, geps, n_groups)
    _rows_into_h(y, wo, bo, h, mult, counters, st + 4, t, n_threads, col, cursor)


@nb.njit(fastmath=True, cache=True)
def _gqa_seq(st, t, n_threads, counters, cursor, col, h, xn, mult, n_pos, wqkv, bqkv, wo, bo, inv_freq, scale, kmul,
             n_heads, n_kv, kb, vb, lens, pos, qkv, att, scores, qv, acc):
    """An attention block after its norm over B * T rows: row b's new keys and values (k times kmul, rotated at
    pos[b] + i) go to slots lens[b] + i of kb / vb (B, n_kv, cap, D); position i attends to slots
    [0, lens[b] + i]; then h += mult * o_proj(att) (stages st + 1 .. st + 3)."""
    d = kb.shape[3]
    dq = n_heads * d
    rep = n_heads // n_kv
    rotary = inv_freq.shape[0] > 0
    _rows_into(xn, wqkv, bqkv, qkv, counters, st + 1, t, n_threads, col, cursor)
    n2 = (h.shape[0] // n_pos) * n_kv
    cursor[0] = 0
    while True:
        chunk = _next_chunk(counters, st + 2, n2, t, n_threads, cursor)
        if chunk < 0:
            break
        b, g = chunk // n_kv, chunk % n_kv
        koff, voff = dq + g * d, dq + n_kv * d + g * d
        for i in range(n_pos):
            r = b * n_pos + i
            for j in range(d):
                qkv[r, koff + j] *= kmul
            if rotary:
                _rotate(qkv[r], koff, inv_freq, pos[b] + i)
            for j in range(d):
                kb[b, g, lens[b] + i, j] = qkv[r, koff + j]
                vb[b, g, lens[b] + i, j] = qkv[r, voff + j]
        for i in range(n_pos):
            r = b * n_pos + i
            count = lens[b] + i + 1
            for q in range(rep):  # the group's query heads together: each key and value is read once
                qoff = (g * rep + q) * d
                if rotary:
                    _rotate(qkv[r], qoff, inv_freq, pos[b] + i)
                for j in range(d):
                    qv[q, j] = qkv[r, qoff + j] * scale
                    acc[q, j] = 0
            rows_blocked(kb[b, g, :count], qv, 0, rep, kb[b, g, 0, :0], scores)
            for q in range(rep):
                sr = scores[q, :count]
                m = sr[0]
                for j in range(1, count):
                    m = max(m, sr[j])
                tot = m - m
                for j in range(count):
                    e = fast_exp(sr[j] - m)
                    sr[j] = e
                    tot += e
                inv = 1 / tot
                for j in range(count):
                    sr[j] *= inv
            for j in range(count):
                vj = vb[b, g, j]
                for q in range(rep):
                    e = scores[q, j]
                    for u in range(d):
                        acc[q, u] += e * vj[u]
            for q in range(rep):
                qoff = (g * rep + q) * d
                for u in range(d):
                    att[r, qoff + u] = acc[q, u]
        _finish_stage(counters, st + 2, n_threads)
    _wait_stage(counters, st + 2, n2, n_threads)
    _rows_into_h(att, wo, bo, h, mult, counters, st + 3, t, n_threads, col, cursor)


@nb.njit(parallel=True, fastmath=True, cache=True)
def verify_stack(h, n_pos, kinds, index, norm_w, norm_eps, res_mult, final_w, final_eps, final_div,
                 m_in_w, m_in_b, m_conv_w, m_conv_b, m_dt_b, m_a_log, m_d, m_gnorm_w, m_consts, n_groups, m_out_w,
                 m_out_b, conv_state, ssm_state, raw, xbc, dts,
                 f_up_w, f_up_b, f_gate_w, f_gate_b, f_down_w, f_down_b, f_acts, f_consts,
                 a_qkv_w, a_qkv_b, a_o_w, a_o_b, a_inv_freq, a_consts, n_heads, n_kv, k_buf, v_buf, lens, pos,
                 xn, zb, y, hid, qkv, att, out, w_head, b_head, logits, counters, n_threads):
    """T = n_pos new tokens per row through the stack: h (B T, d_model) their embeddings (row b * T + i), updated
    in place; logits (B T, V). Weights as :func:`._numba_decode_hybrid.hybrid_stack` takes them. Mamba-2 states
    conv (n, B, C, K - 1) and ssm (n, B, Di, N) are read only; the pass keeps per position raw (n, B T, C) conv
    inputs, xbc (n, B T, C) conv outputs and dts (n, B T, 2 H) for :func:`rollback`. KV buffers (n_att, B, n_kv,
    cap, D): row b's cache is slots [0, lens[b]); the new entries go to lens[b] + i at rotary position pos[b] + i
    (pos in h's dtype). Scratch: xn (B T, d_model), zb / y (B T, Di), hid (B T max F,), qkv, att as
    hybrid_stack's with B T rows. counters: int64 zeros (counter_slots(STAGES L + 2, threads),)."""
    n_rows = h.shape[0]
    n_layers = kinds.shape[0]
    cap = k_buf.shape[3]
    for t in nb.prange(n_threads):
        col = np.empty((_ROWS_LINEAR, n_rows), dtype=h.dtype)
        col2 = np.empty((_ROWS_LINEAR, n_rows), dtype=h.dtype)
        rep = n_heads // n_kv
        scores = np.empty((rep, cap), dtype=h.dtype)
        qv = np.empty((rep, k_buf.shape[4]), dtype=h.dtype)
        acc = np.empty((rep, k_buf.shape[4]), dtype=h.dtype)
        sbuf = np.empty(ssm_state.shape[3], dtype=h.dtype)
        cursor = np.zeros(1, dtype=np.int64)
        for layer in range(n_layers):
            st = STAGES * layer
            _norm_stage(counters, st, n_threads, h, norm_w[layer], norm_eps[layer], xn, True)
            k, i = kinds[layer], index[layer]
            mult = res_mult[layer]
            if k == MAMBA2:
                _mamba2_seq(st, t, n_threads, counters, cursor, col, h, xn, mult, n_pos, m_in_w[i], m_in_b[i],
                            m_conv_w[i], m_conv_b[i], conv_state[i], m_dt_b[i], m_a_log[i], m_d[i], m_gnorm_w[i],
                            m_consts[i, 0], m_consts[i, 1], m_consts[i, 2], n_groups, m_out_w[i], m_out_b[i],
                            ssm_state[i], raw[i], zb, xbc[i], dts[i], y, sbuf)
            elif k == FFN:
                _ffn_block(st, t, n_threads, counters, cursor, col, col2, h, xn, mult, f_up_w[i], f_up_b[i],
                           f_gate_w[i], f_gate_b[i], f_down_w[i], f_down_b[i], f_acts[i], f_consts[i, 0],
                           f_consts[i, 1], hid)
            else:
                _gqa_seq(st, t, n_threads, counters, cursor, col, h, xn, mult, n_pos, a_qkv_w[i], a_qkv_b[i],
                         a_o_w[i], a_o_b[i], a_inv_freq[i], a_consts[i, 0], a_consts[i, 1], n_heads, n_kv,
                         k_buf[i], v_buf[i], lens, pos, qkv, att, scores, qv, acc)
        final_head(STAGES * n_layers, t, n_threads, counters, cursor, h, final_w, final_eps, final_div, out, w_head,
                   b_head, col, logits)


@nb.njit(fastmath=True, cache=True)
def rollback(conv_state, ssm_state, raw, xbc, dts, n_pos, keep, n_groups):
    """Advance every Mamba-2 layer's states in place through row b's first keep[b] (0..T) positions of the last
    :func:`verify_stack` pass (its raw, xbc, dts): conv (n, B, C, K - 1) takes the last K - 1 inputs, ssm
    (n, B, Di, N) the same recurrence the pass ran."""
    n_layers, n_b, n_conv, km1 = conv_state.shape
    di, n_state = ssm_state.shape[2], ssm_state.shape[3]
    n_heads = dts.shape[2] // 2
    headdim = di // n_heads
    per_group = n_heads // n_groups
    for layer in range(n_layers):
        for b in range(n_b):
            kb = keep[b]
            if kb == 0:
                continue
            r0 = b * n_pos
            cs = conv_state[layer, b]
            for j in range(km1):  # window entry j after kb inputs: entry kb + j of (state, new inputs)
                at = kb + j
                if at < km1:
                    for c in range(n_conv):
                        cs[c, j] = cs[c, at]
                else:
                    rr = raw[layer, r0 + at - km1]
                    for c in range(n_conv):
                        cs[c, j] = rr[c]
            for c in range(di):
                hh = c // headdim
                boff = di + (hh // per_group) * n_state
                s = ssm_state[layer, b, c]
                for r in range(r0, r0 + kb):
                    xr = xbc[layer, r]
                    dx = dts[layer, r, hh] * xr[c]
                    da = dts[layer, r, n_heads + hh]
                    bv = xr[boff:boff + n_state]  # contiguous 1-D views: the loop over n vectorises
                    for n in range(n_state):
                        s[n] = s[n] * da + dx * bv[n]

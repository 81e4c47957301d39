"""Numba kernels for speculative decoding of pure-Mamba stacks: the draft's token tree and the target's verify pass,
each one launch (the weights read once per launch, no Python between positions).

Nodes are numbered per row in breadth-first order (node 0 = the root); ``parents[i] < i``; ``win[i]`` (T, K) holds
the positions of node i's last K conv inputs in [the K - 1 conv-state entries, the T nodes] (node i last). A chain
of k tokens is the tree with ``parents[i] = i - 1``. Per layer the kernels keep every node's conv input
(``node_x`` (L, B * T, Di), row b * T + i) and SSM state (``node_ssm`` (L, B, T, Di, N)), so any node's state is
a gather afterwards. Each node's arithmetic is the fused decode step's (:func:`ssmkit.ops.mamba_stack_step`), in the
same order, with its parent's state in place of the previous token's.

Both kernels work on a set of "active" node rows at a time: ``act_b[a], act_i[a]`` give active row a's batch row
and node. The verify pass makes every node active at once (one pass over the weights); the draft steps the tree
level by level (a level's children need its top-b tokens).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import overload

from ..ops._numba_decode import (
    _claim,
    _finish_stage,
    _next_chunk,
    _rms_norm,
    _rows_times_weight,
    _wait_stage,
)
from ..ops._numba_kernels import fast_softplus

_ROWS_IN = 32  # in_proj rows per chunk
_ROWS_X = 4  # x_proj rows per chunk
_CHANNELS = 64  # scan channels per chunk
_ROWS_OUT = 16  # out_proj rows per chunk
_ROWS_HEAD = 64  # LM head rows per chunk


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


@nb.njit(parallel=True, fastmath=True, cache=True)
def verify_tree(h, parents, win, act_b, act_i, n_nodes, norm_w, eps, final_w, final_eps, w_in, s_in, b_in, conv_w,
                conv_b, conv_state, w_x, s_x, w_dt, b_dt, a_log, d_skip, w_out, s_out, b_out, ssm_state, node_x,
                node_ssm, xn, xz, u, xdbl, y, out, w_head, s_head, b_head, logits, counters, n_threads):
    """Every node of every row through the stack in one launch: h (B * T, d_model) embedded node tokens (row
    b * T + i, updated in place) -> out (final-normed hidden) and logits (B * T, V). Weights as for
    :func:`ssmkit.ops._numba_decode.mamba_stack` (typed Lists per layer); states conv (L, B, Di, K - 1),
    ssm (L, B, Di, N); scratch xn (B T, d_model), xz (B T, 2 Di), u, y (B T, Di), xdbl (B T, R + 2N).
    Stages and counters as in mamba_stack (counter_slots(5 L + 2, n_threads))."""
    rows = h.shape[0]
    n_layers = len(w_in)
    di = u.shape[1]
    for t in nb.prange(n_threads):
        col = np.empty(rows, dtype=h.dtype)
        cursor = np.zeros(1, dtype=np.int64)
        for layer in range(n_layers):
            st = 5 * layer
            wi, wx, wo = w_in[layer], w_x[layer], w_out[layer]
            if _claim(counters, st, 0, n_threads) == 0:
                _rms_norm(h, norm_w[layer], eps, xn)
                _finish_stage(counters, st, n_threads)
            _wait_stage(counters, st, 1, n_threads)
            n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
                if chunk < 0:
                    break
                _in_conv(chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN), xn, wi, s_in[layer],
                         b_in[layer], conv_w[layer], conv_b[layer], conv_state[layer], win, act_b, act_i, n_nodes,
                         node_x[layer], xz, u, col)
                _finish_stage(counters, st + 1, n_threads)
            _wait_stage(counters, st + 1, n1, n_threads)
            n2 = (wx.shape[0] + _ROWS_X - 1) // _ROWS_X
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 2, n2, t, n_threads, cursor)
                if chunk < 0:
                    break
                _x_rows(chunk * _ROWS_X, min(wx.shape[0], chunk * _ROWS_X + _ROWS_X), u, wx, s_x[layer],
                        b_dt[layer][:0], xdbl, col)
                _finish_stage(counters, st + 2, n_threads)
            _wait_stage(counters, st + 2, n2, n_threads)
            n3 = (di + _CHANNELS - 1) // _CHANNELS
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 3, n3, t, n_threads, cursor)
                if chunk < 0:
                    break
                _scan(chunk * _CHANNELS, min(di, chunk * _CHANNELS + _CHANNELS), w_dt[layer], b_dt[layer],
                      a_log[layer], d_skip[layer], ssm_state[layer], node_ssm[layer], parents, act_b, act_i, xdbl,
                      xz, u, y)
                _finish_stage(counters, st + 3, n_threads)
            _wait_stage(counters, st + 3, n3, n_threads)
            n4 = (wo.shape[0] + _ROWS_OUT - 1) // _ROWS_OUT
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 4, n4, t, n_threads, cursor)
                if chunk < 0:
                    break
                _out_rows(chunk * _ROWS_OUT, min(wo.shape[0], chunk * _ROWS_OUT + _ROWS_OUT), y, wo, s_out[layer],
                          b_out[layer], h, out, col)
                _finish_stage(counters, st + 4, n_threads)
            _wait_stage(counters, st + 4, n4, n_threads)
        if _claim(counters, 5 * n_layers, 0, n_threads) == 0:
            _rms_norm(h, final_w, final_eps, out)
            _finish_stage(counters, 5 * n_layers, n_threads)
        _wait_stage(counters, 5 * n_layers, 1, n_threads)
        n5 = (w_head.shape[0] + _ROWS_HEAD - 1) // _ROWS_HEAD
        cursor[0] = 0
        while True:
            chunk = _next_chunk(counters, 5 * n_layers + 1, n5, t, n_threads, cursor)
            if chunk < 0:
                break
            lo = chunk * _ROWS_HEAD
            _gemm(out, w_head, s_head, b_head, lo, min(w_head.shape[0], lo + _ROWS_HEAD), logits, col)


@nb.njit(fastmath=True, cache=True)
def draft_tree(root, branches, depth, emb, parents, win, norm_w, eps, final_w, final_eps, w_in, s_in, b_in, conv_w,
               conv_b, conv_state, w_x, s_x, w_dt, b_dt, a_log, d_skip, w_out, s_out, b_out, ssm_state, w_head, s_head,
               b_head, node_tok, node_x, node_ssm):
    """The draft's top-``branches`` tokens per level down to ``depth`` (one thread; the draft is small):
    root (B,) int64 -> node_tok (B, T) (node 0 = the root; node i's children i * branches + 1 + c are its best
    tokens, best first, the first index on ties), stepping every node (leaves too), so node_x / node_ssm hold the
    draft's state after any node. Weights and states as for :func:`verify_tree`; emb (V, d_model) the embedding,
    w_head (V, d_model) the LM head."""
    batch, n_nodes = node_tok.shape
    d_model = emb.shape[1]
    di = d_skip[0].shape[0]
    vocab = w_head.shape[0]
    for b in range(batch):
        node_tok[b, 0] = root[b]
    lo, size = 0, 1
    for level in range(depth + 1):
        rows = batch * size
        act_b = np.empty(rows, dtype=np.int64)
        act_i = np.empty(rows, dtype=np.int64)
        h = np.empty((rows, d_model), dtype=emb.dtype)
        for b in range(batch):
            for j in range(size):
                a = b * size + j
                act_b[a], act_i[a] = b, lo + j
                h[a, :] = emb[node_tok[b, lo + j]]
        xn = np.empty_like(h)
        xz = np.empty((rows, 2 * di), dtype=h.dtype)
        u = np.empty((rows, di), dtype=h.dtype)
        y = np.empty((rows, di), dtype=h.dtype)
        col = np.empty(rows, dtype=h.dtype)
        for layer in range(len(w_in)):
            wi, wx, wo = w_in[layer], w_x[layer], w_out[layer]
            xdbl = np.empty((rows, wx.shape[0]), dtype=h.dtype)
            _rms_norm(h, norm_w[layer], eps, xn)
            _in_conv(0, wi.shape[0], xn, wi, s_in[layer], b_in[layer], conv_w[layer], conv_b[layer],
                     conv_state[layer], win, act_b, act_i, n_nodes, node_x[layer], xz, u, col)
            _x_rows(0, wx.shape[0], u, wx, s_x[layer], b_dt[layer][:0], xdbl, col)
            _scan(0, di, w_dt[layer], b_dt[layer], a_log[layer], d_skip[layer], ssm_state[layer], node_ssm[layer],
                  parents, act_b, act_i, xdbl, xz, u, y)
            _out_rows(0, wo.shape[0], y, wo, s_out[layer], b_out[layer], h, xn, col)
        if level == depth:
            break
        out = np.empty_like(h)
        _rms_norm(h, final_w, final_eps, out)
        lg = np.empty((rows, vocab), dtype=h.dtype)
        _gemm(out, w_head, s_head, b_head, 0, vocab, lg, col)
        taken = np.zeros(vocab, dtype=np.bool_)
        for a in range(rows):
            taken[:] = False
            for c in range(branches):
                best = -1
                for v in range(vocab):
                    if not taken[v] and (best < 0 or lg[a, v] > lg[a, best]):
                        best = v
                taken[best] = True
                node_tok[act_b[a], act_i[a] * branches + 1 + c] = best
        lo, size = lo + size, size * branches


@nb.njit(cache=True)
def select_states(conv, node_x, node_ssm, win, node, rows, out_conv, out_ssm):
    """The states after the path root..node[j] of batch row rows[j]: out_ssm[l, j] = node_ssm[l, rows[j], node[j]]
    and out_conv[l, j] the last K - 1 conv inputs of that path. conv (L, B, Di, K - 1), node_x (L, B, T, Di),
    node_ssm (L, B, T, Di, N), win (T, K); out_conv (L, m, Di, K - 1), out_ssm (L, m, Di, N)."""
    km1 = conv.shape[3]
    for layer in range(conv.shape[0]):
        for j in range(node.shape[0]):
            b, i = rows[j], node[j]
            out_ssm[layer, j] = node_ssm[layer, b, i]
            for s in range(km1):
                p = win[i, s + 1]
                if p < km1:
                    out_conv[layer, j, :, s] = conv[layer, b, :, p]
                else:
                    out_conv[layer, j, :, s] = node_x[layer, b, p - km1]

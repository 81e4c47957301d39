"""Numba kernels for speculative decoding of pure-Mamba stacks: the draft's token tree and the target's verify pass,
each one launch (the weights read once per launch, no Python between positions).

Nodes are numbered per row in breadth-first order (node 0 = the root); ``parents[i] < i``; ``win[i]`` (T, K) holds
the positions of node i's last K conv inputs in [the K - 1 conv-state entries, the T nodes] (node i last). A chain
of k tokens is the tree with ``parents[i] = i - 1``. Per layer the kernels keep every node's conv input
(``node_x`` (L, B * T, Di), row b * T + i) and SSM state (``node_ssm`` (L, B, T, N, Di), state-major so the scan
vectorises over channels), so any node's state is a gather afterwards. The per-layer stages are in
:mod:`._numba_spec_stages`.

Both kernels work on a set of "active" node rows at a time: ``act_b[a], act_i[a]`` give active row a's batch row
and node. The verify pass makes every node active at once (one pass over the weights); the draft steps the tree
level by level (a level's children need its top-b tokens).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..ops._numba_decode import _claim, _finish_stage, _next_chunk, _norm_stage, _rms_norm, _wait_stage
from ._numba_spec_stages import _gemm, _in_conv, _out_rows, _scan, _x_rows, scan_scratch

_ROWS_IN = 32  # in_proj rows per chunk
_ROWS_X = 4  # x_proj rows per chunk
_CHANNELS = 128  # scan channels per chunk (64: 18% more time per node and layer, fewer channels per loop)
_ROWS_OUT = 16  # out_proj rows per chunk
_ROWS_HEAD = 64  # LM head rows per chunk


@nb.njit(parallel=True, fastmath=True, cache=True)
def verify_tree(h, parents, win, act_b, act_i, n_nodes, norm_w, eps, final_w, final_eps, w_in, s_in, b_in, conv_w,
                conv_b, conv_state, w_x, s_x, w_dt, b_dt, neg_a, d_skip, w_out, s_out, b_out, ssm_state, node_x,
                node_ssm, xn, xz, u, xdbl, y, out, w_head, s_head, b_head, logits, counters, n_threads):
    """Every node of every row through the stack in one launch: h (B * T, d_model) embedded node tokens (row
    b * T + i, updated in place) -> out (final-normed hidden) and logits (B * T, V). Weights as for
    :func:`ssmkit.ops._numba_decode.mamba_stack` (typed Lists per layer) except conv_w (K, Di) and w_dt (R, Di)
    transposed and neg_a (N, Di) = -exp(A_log).T in place of A_log; states conv (L, B, K - 1, Di) and
    ssm (L, B, N, Di) (both transposed); scratch xn (B T, d_model), xz (B T, 2 Di), u, y (B T, Di), xdbl (B T, R + 2N).
    Stages and counters as in mamba_stack (counter_slots(5 L + 2, n_threads))."""
    rows = h.shape[0]
    n_layers = len(w_in)
    di = u.shape[1]
    n_work, n_bits = scan_scratch(neg_a[0].shape[0], max(_CHANNELS, _ROWS_IN))
    for t in nb.prange(n_threads):
        col = np.empty(rows, dtype=h.dtype)
        cursor = np.zeros(1, dtype=np.int64)
        work = np.empty(n_work, dtype=h.dtype)
        bits = np.empty(n_bits, dtype=np.int32)
        for layer in range(n_layers):
            st = 5 * layer
            wi, wx, wo = w_in[layer], w_x[layer], w_out[layer]
            _norm_stage(counters, st, n_threads, h, norm_w[layer], eps, xn, True)
            n1 = (wi.shape[0] + _ROWS_IN - 1) // _ROWS_IN
            cursor[0] = 0
            while True:
                chunk = _next_chunk(counters, st + 1, n1, t, n_threads, cursor)
                if chunk < 0:
                    break
                _in_conv(chunk * _ROWS_IN, min(wi.shape[0], chunk * _ROWS_IN + _ROWS_IN), xn, wi, s_in[layer],
                         b_in[layer], conv_w[layer], conv_b[layer], conv_state[layer], win, act_b, act_i, n_nodes,
                         node_x[layer], xz, u, col, work, bits)
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
                      neg_a[layer], d_skip[layer], ssm_state[layer], node_ssm[layer], parents, act_b, act_i, xdbl,
                      xz, u, y, work, bits)
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
               conv_b, conv_state, w_x, s_x, w_dt, b_dt, neg_a, d_skip, w_out, s_out, b_out, ssm_state, w_head, s_head,
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
    n_work, n_bits = scan_scratch(neg_a[0].shape[0], di)
    work = np.empty(n_work, dtype=emb.dtype)
    bits = np.empty(n_bits, dtype=np.int32)
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
                     conv_state[layer], win, act_b, act_i, n_nodes, node_x[layer], xz, u, col, work, bits)
            _x_rows(0, wx.shape[0], u, wx, s_x[layer], b_dt[layer][:0], xdbl, col)
            _scan(0, di, w_dt[layer], b_dt[layer], neg_a[layer], d_skip[layer], ssm_state[layer], node_ssm[layer],
                  parents, act_b, act_i, xdbl, xz, u, y, work, bits)
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
    """The states after the path root..node[j] of batch row rows[j]: out_ssm[l, j] = node_ssm[l, rows[j], node[j]].T
    and out_conv[l, j] the last K - 1 conv inputs of that path. conv (L, B, Di, K - 1), node_x (L, B, T, Di),
    node_ssm (L, B, T, N, Di), win (T, K); out_conv (L, m, Di, K - 1), out_ssm (L, m, Di, N)."""
    km1 = conv.shape[3]
    for layer in range(conv.shape[0]):
        for j in range(node.shape[0]):
            b, i = rows[j], node[j]
            src, dst = node_ssm[layer, b, i], out_ssm[layer, j]
            for c in range(dst.shape[0]):
                for n in range(dst.shape[1]):
                    dst[c, n] = src[n, c]
            for s in range(km1):
                p = win[i, s + 1]
                if p < km1:
                    out_conv[layer, j, :, s] = conv[layer, b, :, p]
                else:
                    out_conv[layer, j, :, s] = node_x[layer, b, p - km1]


@nb.njit(inline="always", cache=True)
def _roll_back(node_x, node_ssm, conv_t, ssm, win, b, i, n_nodes):
    """Row b's states (conv_t (L, B, K - 1, Di), ssm (L, B, N, Di), in place) := those after the path root..i."""
    km1 = conv_t.shape[2]
    for layer in range(conv_t.shape[0]):
        ssm[layer, b] = node_ssm[layer, b, i]
        for s in range(km1):  # win[i, s + 1] > s: the entries read are not yet overwritten
            p = win[i, s + 1]
            if p < km1:
                conv_t[layer, b, s] = conv_t[layer, b, p]
            else:
                conv_t[layer, b, s] = node_x[layer, b * n_nodes + p - km1]


@nb.njit(cache=True)
def accept_round(nodes, logits, parents, t_win, t_node_x, t_node_ssm, t_conv, t_ssm, d_win, d_node_x, d_node_ssm,
                 d_conv, d_ssm, toks, count):
    """Greedy acceptance of a verified tree and the rollback of both models, per row b: g = argmax of each node's
    logits (the first on ties, as torch.argmax); a node is accepted when its parent is and its token is the
    parent's g; the deepest accepted node ``best`` (a path: siblings differ) gives toks[b, :n] its path below the
    root, toks[b, n] = g[best], count[b] = n + 1; the target's states (t_conv (L, B, K - 1, Di), t_ssm (L, B, N, Di))
    and the draft's become those after root..best (from each model's node_x (L, B T, Di), node_ssm
    (L, B, T, N, Di); t_win / d_win each model's conv windows). nodes (B, T) int64, logits (B, T, V), toks
    (B, depth + 1), count (B,) int64."""
    batch, n_nodes = nodes.shape
    g = np.empty(n_nodes, dtype=np.int64)
    dep = np.empty(n_nodes, dtype=np.int64)
    ok = np.empty(n_nodes, dtype=np.bool_)
    for b in range(batch):
        for i in range(n_nodes):
            lg = logits[b, i]
            k = 0
            for v in range(1, lg.shape[0]):
                if lg[v] > lg[k]:
                    k = v
            g[i] = k
        ok[0], dep[0], best = True, 0, 0
        for i in range(1, n_nodes):
            p = parents[i]
            dep[i] = dep[p] + 1
            ok[i] = ok[p] and nodes[b, i] == g[p]
            if ok[i] and dep[i] > dep[best]:
                best = i
        n = dep[best]
        i = best
        for j in range(n - 1, -1, -1):
            toks[b, j] = nodes[b, i]
            i = parents[i]
        toks[b, n] = g[best]
        count[b] = n + 1
        _roll_back(t_node_x, t_node_ssm, t_conv, t_ssm, t_win, b, best, n_nodes)
        _roll_back(d_node_x, d_node_ssm, d_conv, d_ssm, d_win, b, best, n_nodes)

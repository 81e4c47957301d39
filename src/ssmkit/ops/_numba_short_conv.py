"""Fused CPU kernels (numba) for the short causal depthwise convolution, optionally followed by SiLU.

Layout: the input x is read in place from its storage (no padded copy): ``x`` is a flat 1-D array and row ``t`` of
batch ``b`` starts at ``off + b * sb + t * sl`` (so a channel slice of a wider tensor, e.g. one half of Mamba's
in_proj output, needs no copy). ``ctx`` (B, W-1, C) holds the W-1 inputs before x (oldest first); the padded
position p in [0, W-1+L) is ctx[b, p] for p < W-1 and x row p-(W-1) after. ``seg`` (B, W-1+L) gives each padded
position's segment id (ignored unless ``use_seg``): tap k of output t reads position p = t+k and is dropped when
seg[b, p] differs from seg[b, t+W-1].

    a[b, t] = bias + sum_k wt[k] * xp[b, t + k];    y = silu(a) if ``silu`` else a

The backward recomputes a (it saves nothing but the inputs) and splits the padded positions into tiles of
:data:`ROWS`; a tile owns the gradient rows of its positions, its weight-gradient terms (t, k) with t + k in the
tile, and the bias-gradient rows t with t + W-1 in it, so partial sums are per tile and added in a fixed order.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._numba_kernels import EXACT_MATH, fast_exp, fma

ROWS = 64  # time rows per parallel task


@nb.njit(fastmath=EXACT_MATH, error_model="numpy", inline="always", cache=True)
def _row(x, off, sb, sl, ctx, b, p, W, C):
    """Padded position p of batch b, a (C,) view."""
    if p < W - 1:
        return ctx[b, p]
    s = off + b * sb + (p - W + 1) * sl
    return x[s:s + C]


@nb.njit(fastmath=EXACT_MATH, error_model="numpy", inline="always", cache=True)
def _preact(x, off, sb, sl, ctx, wt, bias, seg, use_seg, b, t, acc):
    """acc[:] = bias + sum of the unmasked taps of output t."""
    W, C = wt.shape
    for c in range(C):
        acc[c] = bias[c]
    for k in range(W):
        if use_seg and seg[b, t + k] != seg[b, t + W - 1]:
            continue
        xr = _row(x, off, sb, sl, ctx, b, t + k, W, C)
        wk = wt[k]
        for c in range(C):
            acc[c] = fma(wk[c], xr[c], acc[c])


@nb.njit(parallel=True, fastmath=EXACT_MATH, error_model="numpy", cache=True)
def conv_fwd(x, off, sb, sl, ctx, wt, bias, seg, use_seg, silu, out):  # pragma: no cover - compiled
    """out (B, L, C) = silu(a) or a (see the module docstring)."""
    nbat, L, C = out.shape
    one = np.ones(1, dtype=out.dtype)[0]
    ntask = (L + ROWS - 1) // ROWS
    for task in nb.prange(nbat * ntask):
        b = task // ntask
        t0 = (task % ntask) * ROWS
        for t in range(t0, min(L, t0 + ROWS)):
            o = out[b, t]
            _preact(x, off, sb, sl, ctx, wt, bias, seg, use_seg, b, t, o)
            if silu:
                for c in range(C):
                    o[c] = o[c] / (one + fast_exp(-o[c]))


@nb.njit(parallel=True, fastmath=EXACT_MATH, error_model="numpy", cache=True)
def conv_bwd(x, off, sb, sl, ctx, wt, bias, seg, use_seg, silu, g, gx, gctx, gw_part, gb_part):  # pragma: no cover
    """Gradients of :func:`conv_fwd` for the output gradient g (B, L, C): gx (B, L, C), gctx (B, W-1, C), and per
    task gw_part (tasks, W, C) and gb_part (tasks, C), to be summed over tasks."""
    nbat, L, C = g.shape
    W = wt.shape[0]
    lp = L + W - 1
    one = np.ones(1, dtype=g.dtype)[0]
    ntask = (lp + ROWS - 1) // ROWS
    for task in nb.prange(nbat * ntask):
        b = task // ntask
        p0 = (task % ntask) * ROWS
        p1 = min(lp, p0 + ROWS)
        ta = max(0, p0 - W + 1)  # outputs t that reach positions p0..p1-1
        tb = min(L, p1)
        ga = np.empty((max(tb - ta, 1), C), dtype=g.dtype)
        acc = np.empty(C, dtype=g.dtype)
        for t in range(ta, tb):
            gr = g[b, t]
            gar = ga[t - ta]
            if silu:
                _preact(x, off, sb, sl, ctx, wt, bias, seg, use_seg, b, t, acc)
                for c in range(C):
                    s = one / (one + fast_exp(-acc[c]))
                    gar[c] = gr[c] * s * fma(acc[c], one - s, one)
            else:
                for c in range(C):
                    gar[c] = gr[c]
        gw = gw_part[task]
        gb = gb_part[task]
        for p in range(p0, p1):
            o = gctx[b, p] if p < W - 1 else gx[b, p - W + 1]
            for c in range(C):
                o[c] = 0.0
            xr = _row(x, off, sb, sl, ctx, b, p, W, C)
            for k in range(W):
                t = p - k
                if t < 0 or t >= L:
                    continue
                gar = ga[t - ta]
                if k == W - 1:
                    for c in range(C):
                        gb[c] += gar[c]
                if use_seg and seg[b, p] != seg[b, t + W - 1]:
                    continue
                wk = wt[k]
                gwk = gw[k]
                for c in range(C):
                    o[c] = fma(wk[c], gar[c], o[c])
                    gwk[c] = fma(gar[c], xr[c], gwk[c])

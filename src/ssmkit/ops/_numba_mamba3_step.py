"""Fused CPU kernel (numba) for one token of Mamba-3's SSM core (see :mod:`ssmkit.ops.reference_mamba3` for the
recurrence), SISO and MIMO alike.

It runs the sequence kernel's own step (:func:`ssmkit.ops._numba_mamba3._step`, then the same output dot product)
on a length-1 layout, so a token stepped here equals, bit for bit, the same token run by the fused forward.

Layout (C-contiguous, batch-first, one dtype): x, y: (b, 1, R, H, P); dt, A, lam: (b, 1, H); B, C: (b, 1, R, G, N);
Bb, Cb: (H, R, N); w: (b, 1, H, S) (zeros without angles: the state's angles still rotate B and C); Dv: (H,);
one: (1,) holding 1 in the dtype (the forward's keep factor; a float64 literal would promote float32 math).
States in: th0 (b, H, S), h0 (b, H, P, N), k0 (b, R, H, N), x0 (b, R, H, P); out: th1, h1, k1 (new arrays, the
inputs are only read; the new x state is x itself). One task per (batch, head).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._numba_kernels import EXACT_MATH
from ._numba_mamba3 import _dot, _step


@nb.njit(fastmath=EXACT_MATH, cache=True)
def _step_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, one, th0, h0, k0, x0, y, th1, h1, k1):
    R, H, P = x.shape[2], x.shape[3], x.shape[4]
    G, N = B.shape[3], B.shape[4]
    S = w.shape[3]
    bi, hh = task // H, task % H
    g = hh // (H // G)
    th = th1[bi, hh]
    h = h1[bi, hh]
    th[:] = th0[bi, hh]
    h[:, :] = h0[bi, hh]
    k = np.empty((R, N), dtype=x.dtype)
    q = np.empty((R, N), dtype=x.dtype)
    cs = np.empty(S, dtype=x.dtype)
    sn = np.empty(S, dtype=x.dtype)
    lanes = np.empty(8, dtype=x.dtype)
    kp = k0[bi, :, hh].copy()  # contiguous copies: strided views would keep the loops over n from vectorising
    xp = x0[bi, :, hh].copy()
    _step(x, dt, A, lam, B, C, Bb, Cb, w, bi, 0, hh, g, one[0], th, h, kp, xp, k, q, cs, sn)
    for r in range(R):
        for p in range(P):
            y[bi, 0, r, hh, p] = _dot(h[p], q[r], lanes) + Dv[hh] * x[bi, 0, r, hh, p]
        for n in range(N):
            k1[bi, r, hh, n] = k[r, n]


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def mamba3_step_kernel(x, dt, A, lam, B, C, Bb, Cb, w, Dv, one, th0, h0, k0, x0, y, th1, h1, k1):
    """One token for every (batch, head): y and the new states th1, h1, k1 written in place."""
    for task in nb.prange(x.shape[0] * x.shape[3]):
        _step_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, one, th0, h0, k0, x0, y, th1, h1, k1)

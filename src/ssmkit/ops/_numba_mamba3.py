"""Fused CPU kernels (numba) for Mamba-3's SSM core, forward and backward (see :mod:`ssmkit.ops.reference_mamba3`
for the recurrence).

Layout (C-contiguous, batch-first, one dtype): x, y: (b, L, R, H, P); dt, A, lam: (b, L, H); B, C: (b, L, R, G, N);
Bb, Cb: (H, R, N); w: (b, L, H, S); Dv: (H,); keep: (b, L), 0 where the state is zeroed before step t (reverse
resets already shifted by the caller). States: th (b, H, S), h (b, H, P, N), k (b, R, H, N), x (b, R, H, P).
One task per (batch, head) runs the whole sequence; head h reads group h // (H / G). Processing step i is time
t = i, or L-1-i with ``reverse``. The forward saves the state before every ``M3_CHUNK``-th step; the backward
recomputes each chunk from its checkpoint into a (T+1, P, N) buffer and walks it backwards, never storing
(L, P, N). No fast-math flag reorders or fuses floating-point operations (see ``_numba_kernels.EXACT_MATH``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._numba_kernels import EXACT_MATH

M3_CHUNK = 32  # steps between state checkpoints
_TWO_PI = 2.0 * math.pi


@nb.njit(fastmath=EXACT_MATH, cache=True)
def _dot(a, b, lanes):
    """sum_i a_i b_i over 1-D a, b in 8 interleaved partial sums (a vector of 8 lanes, scratch ``lanes``) added
    in a fixed tree, then the tail: one exact definition that vectorises without reordering anything."""
    n = a.shape[0]
    m = n - n % 8
    for v in range(8):
        lanes[v] = 0.0
    for i in range(0, m, 8):
        for v in range(8):
            lanes[v] += a[i + v] * b[i + v]
    tot = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
    for i in range(m, n):
        tot += a[i] * b[i]
    return tot


@nb.njit(fastmath=EXACT_MATH, cache=True)
def _step(x, dt, A, lam, B, C, Bb, Cb, w, bi, t, hh, g, kpv, th, h, kp, xp, k, q, cs, sn):
    """One step in place for task (bi, hh): th, h updated; k, q set to this step's rotated key and query.
    kp, xp (the previous step's key and input) are read, not updated. Returns alpha."""
    R, N = k.shape
    P = h.shape[0]
    S = th.shape[0]
    d = dt[bi, t, hh]
    for s in range(S):
        v = th[s] * kpv + d * w[bi, t, hh, s]
        v = v - _TWO_PI * math.floor(v / _TWO_PI)
        th[s] = v
        cs[s] = math.cos(v)
        sn[s] = math.sin(v)
    for r in range(R):
        for n in range(N):
            k[r, n] = B[bi, t, r, g, n] + Bb[hh, r, n]
            q[r, n] = C[bi, t, r, g, n] + Cb[hh, r, n]
        for s in range(S):
            a0, a1 = k[r, 2 * s], k[r, 2 * s + 1]
            k[r, 2 * s] = a0 * cs[s] - a1 * sn[s]
            k[r, 2 * s + 1] = a0 * sn[s] + a1 * cs[s]
            a0, a1 = q[r, 2 * s], q[r, 2 * s + 1]
            q[r, 2 * s] = a0 * cs[s] - a1 * sn[s]
            q[r, 2 * s + 1] = a0 * sn[s] + a1 * cs[s]
    alpha = math.exp(d * A[bi, t, hh])
    lm = lam[bi, t, hh]
    beta = (1.0 - lm) * d * alpha * kpv
    gamma = lm * d
    al = alpha * kpv
    for p in range(P):  # innermost loops run over n, contiguous, with no reduction: they vectorise
        for n in range(N):
            h[p, n] *= al
        for r in range(R):
            c1 = beta * xp[r, p]
            c2 = gamma * x[bi, t, r, hh, p]
            for n in range(N):
                h[p, n] += c1 * kp[r, n] + c2 * k[r, n]
    return alpha


@nb.njit(fastmath=EXACT_MATH, cache=True)
def _fwd_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, th0, h0, k0, x0, reverse, save,
              ck_th, ck_h, ck_k, ck_x, y, thT, hT, kT, xT):
    """y = the outputs; thT, hT, kT, xT = the final state; ck_*[:, c] = the state before step c * M3_CHUNK."""
    nbat, L, R, H, P = x.shape
    G, N = B.shape[3], B.shape[4]
    S = w.shape[3]
    T = M3_CHUNK
    bi, hh = task // H, task % H
    g = hh // (H // G)
    th = th0[bi, hh].copy()
    h = h0[bi, hh].copy()
    kp = k0[bi, :, hh].copy()
    xp = x0[bi, :, hh].copy()
    k = np.empty((R, N), dtype=x.dtype)
    q = np.empty((R, N), dtype=x.dtype)
    cs = np.empty(S, dtype=x.dtype)
    sn = np.empty(S, dtype=x.dtype)
    lanes = np.empty(8, dtype=x.dtype)
    for i in range(L):
        t = L - 1 - i if reverse else i
        if save and i % T == 0:
            c = i // T
            ck_th[bi, c, hh] = th
            ck_h[bi, c, hh] = h
            ck_k[bi, c, :, hh] = kp
            ck_x[bi, c, :, hh] = xp
        _step(x, dt, A, lam, B, C, Bb, Cb, w, bi, t, hh, g, keep[bi, t], th, h, kp, xp, k, q, cs, sn)
        for r in range(R):
            for p in range(P):
                y[bi, t, r, hh, p] = _dot(h[p], q[r], lanes) + Dv[hh] * x[bi, t, r, hh, p]
        kp[:, :] = k
        for r in range(R):
            for p in range(P):
                xp[r, p] = x[bi, t, r, hh, p]
    thT[bi, hh] = th
    hT[bi, hh] = h
    kT[bi, :, hh] = kp
    xT[bi, :, hh] = xp


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def mamba3_fwd(x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, th0, h0, k0, x0, reverse, save,
               ck_th, ck_h, ck_k, ck_x, y, thT, hT, kT, xT):
    """One task per (batch, head): :func:`_fwd_task`."""
    for task in nb.prange(x.shape[0] * x.shape[3]):
        _fwd_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, th0, h0, k0, x0, reverse, save,
                  ck_th, ck_h, ck_k, ck_x, y, thT, hT, kT, xT)


@nb.njit(fastmath=EXACT_MATH, cache=True)
def _bwd_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, reverse, ck_th, ck_h, ck_k, ck_x,
              gy, gthT, ghT, gkT, gxT, gx, gdt, gA, glam, gBh, gCh, gw, gBb, gCb, gD, gth0, gh0, gk0, gx0):
    """Reverse-time pass. gBh, gCh: (b, L, R, H, N) per-head gradients of B and C (the caller sums each group);
    gBb, gCb: (b, H, R, N) and gD: (b, H) per-batch partials (the caller sums the batch)."""
    nbat, L, R, H, P = x.shape
    G, N = B.shape[3], B.shape[4]
    S = w.shape[3]
    T = M3_CHUNK
    nck = ck_h.shape[1]
    bi, hh = task // H, task % H
    g = hh // (H // G)
    Gh = ghT[bi, hh].copy()
    Gth = gthT[bi, hh].copy()
    pk = gkT[bi, :, hh].copy()
    px = gxT[bi, :, hh].copy()
    hs = np.empty((T + 1, P, N), dtype=x.dtype)
    ks = np.empty((T + 1, R, N), dtype=x.dtype)
    qs = np.empty((T, R, N), dtype=x.dtype)
    css = np.empty((T, S), dtype=x.dtype)
    sns = np.empty((T, S), dtype=x.dtype)
    th = np.empty(S, dtype=x.dtype)
    xp = np.empty((R, P), dtype=x.dtype)
    x_ck = np.empty((R, P), dtype=x.dtype)
    gq = np.empty((R, N), dtype=x.dtype)
    gk = np.empty((R, N), dtype=x.dtype)
    gxl = np.empty((R, P), dtype=x.dtype)
    gxc = np.empty((R, N), dtype=x.dtype)
    gxp = np.empty((R, N), dtype=x.dtype)
    lanes = np.empty(N, dtype=x.dtype)
    lanes8 = np.empty(8, dtype=x.dtype)
    gBb_l = np.zeros((R, N), dtype=x.dtype)
    gCb_l = np.zeros((R, N), dtype=x.dtype)
    gD_l = 0.0
    for c in range(nck - 1, -1, -1):
        i0 = c * T
        n_in = min(L, i0 + T) - i0
        th[:] = ck_th[bi, c, hh]
        hs[0] = ck_h[bi, c, hh]
        ks[0] = ck_k[bi, c, :, hh]
        x_ck[:, :] = ck_x[bi, c, :, hh]
        xp[:, :] = x_ck
        for j in range(n_in):  # recompute the chunk's states, keys, queries and angles
            t = L - 1 - (i0 + j) if reverse else i0 + j
            hs[j + 1] = hs[j]
            _step(x, dt, A, lam, B, C, Bb, Cb, w, bi, t, hh, g, keep[bi, t], th, hs[j + 1], ks[j], xp,
                  ks[j + 1], qs[j], css[j], sns[j])
            for r in range(R):
                for p in range(P):
                    xp[r, p] = x[bi, t, r, hh, p]
        for j in range(n_in - 1, -1, -1):
            i = i0 + j
            t = L - 1 - i if reverse else i
            kpv = keep[bi, t]
            d = dt[bi, t, hh]
            # previous step's input (0 at a reset)
            if j == 0:
                for r in range(R):
                    for p in range(P):
                        xp[r, p] = x_ck[r, p] * kpv
            else:
                tp = t + 1 if reverse else t - 1
                for r in range(R):
                    for p in range(P):
                        xp[r, p] = x[bi, tp, r, hh, p] * kpv
            # outputs: y_r = h q_r + D x_r; then h_t = alpha h_{t-1} + beta sum_r xp_r kp_r^T
            # + gamma sum_r x_r k_r^T. Reductions over p run as vectors over n (lanes, Gx*); the ones over n
            # (into gxl, px) are plain sums.
            alpha = math.exp(d * A[bi, t, hh])
            lm = lam[bi, t, hh]
            beta = (1.0 - lm) * d * alpha
            gamma = lm * d
            for r in range(R):
                for n in range(N):
                    gq[r, n] = 0.0
                    gk[r, n] = pk[r, n]
                    gxc[r, n] = 0.0
                    gxp[r, n] = 0.0
            for n in range(N):
                lanes[n] = 0.0
            for p in range(P):
                for r in range(R):
                    gyv = gy[bi, t, r, hh, p]
                    gD_l += gyv * x[bi, t, r, hh, p]
                    gxl[r, p] = Dv[hh] * gyv + px[r, p]
                    for n in range(N):
                        gq[r, n] += hs[j + 1, p, n] * gyv
                        Gh[p, n] += gyv * qs[j, r, n]
                for n in range(N):
                    lanes[n] += Gh[p, n] * hs[j, p, n]
                for r in range(R):
                    xr = x[bi, t, r, hh, p]
                    xpr = xp[r, p]
                    for n in range(N):
                        gxc[r, n] += Gh[p, n] * xr
                        gxp[r, n] += Gh[p, n] * xpr
                    gxl[r, p] += gamma * _dot(Gh[p], ks[j + 1, r], lanes8)
                    px[r, p] = beta * _dot(Gh[p], ks[j, r], lanes8) * kpv
            g_al = 0.0
            for n in range(N):
                g_al += lanes[n]
            g_al *= kpv
            g_be = 0.0
            g_ga = 0.0
            for r in range(R):
                for n in range(N):
                    g_ga += gxc[r, n] * ks[j + 1, r, n]
                    g_be += gxp[r, n] * ks[j, r, n]
                    gk[r, n] += gamma * gxc[r, n]
                    pk[r, n] = beta * gxp[r, n] * kpv
                for p in range(P):
                    gx[bi, t, r, hh, p] = gxl[r, p]
            ga = g_al * alpha + g_be * beta
            gA[bi, t, hh] = ga * d
            gd = ga * A[bi, t, hh] + g_be * (1.0 - lm) * alpha + g_ga * lm
            glam[bi, t, hh] = -g_be * d * alpha + g_ga * d
            # rotations: k~ = Rot(th) k, q~ = Rot(th) q
            for s in range(S):
                cv, sv = css[j, s], sns[j, s]
                gts = 0.0
                for r in range(R):
                    g0, g1 = gk[r, 2 * s], gk[r, 2 * s + 1]
                    gts += g1 * ks[j + 1, r, 2 * s] - g0 * ks[j + 1, r, 2 * s + 1]
                    gk[r, 2 * s] = cv * g0 + sv * g1
                    gk[r, 2 * s + 1] = cv * g1 - sv * g0
                    g0, g1 = gq[r, 2 * s], gq[r, 2 * s + 1]
                    gts += g1 * qs[j, r, 2 * s] - g0 * qs[j, r, 2 * s + 1]
                    gq[r, 2 * s] = cv * g0 + sv * g1
                    gq[r, 2 * s + 1] = cv * g1 - sv * g0
                Gth[s] += gts
                gw[bi, t, hh, s] = Gth[s] * d
                gd += Gth[s] * w[bi, t, hh, s]
                Gth[s] *= kpv
            for r in range(R):
                for n in range(N):
                    gBh[bi, t, r, hh, n] = gk[r, n]
                    gCh[bi, t, r, hh, n] = gq[r, n]
                    gBb_l[r, n] += gk[r, n]
                    gCb_l[r, n] += gq[r, n]
            gdt[bi, t, hh] = gd
            al = alpha * kpv
            for p in range(P):
                for n in range(N):
                    Gh[p, n] *= al
    gth0[bi, hh] = Gth
    gh0[bi, hh] = Gh
    gk0[bi, :, hh] = pk
    gx0[bi, :, hh] = px
    gBb[bi, hh] = gBb_l
    gCb[bi, hh] = gCb_l
    gD[bi, hh] = gD_l


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def mamba3_bwd(x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, reverse, ck_th, ck_h, ck_k, ck_x,
               gy, gthT, ghT, gkT, gxT, gx, gdt, gA, glam, gBh, gCh, gw, gBb, gCb, gD, gth0, gh0, gk0, gx0):
    """One task per (batch, head): :func:`_bwd_task`."""
    for task in nb.prange(x.shape[0] * x.shape[3]):
        _bwd_task(task, x, dt, A, lam, B, C, Bb, Cb, w, Dv, keep, reverse, ck_th, ck_h, ck_k, ck_x,
                  gy, gthT, ghT, gkT, gxT, gx, gdt, gA, glam, gBh, gCh, gw, gBb, gCb, gD, gth0, gh0, gk0, gx0)

"""Fused CPU kernels (numba) for the diagonal linear recurrence and the selective scan, forward and backward.

Layout conventions (all arrays C-contiguous, batch-first):
- linear scan: a, b, h: (B, L, C) with the channels flattened; states (B, C).
- selective scan: u, dt, z, out: (B, L, D); B, C: (B, L, G, N); At = A^T: (N, D); states (B, N, D), i.e. the
  state is kept channel-minor so the innermost loops run over a block of channels and vectorise.

Time runs over processing steps i = 0..L-1, with t = i (forward) or t = L-1-i (reverse). ``keep[b, t]`` is 0 where
the carried state is zeroed before step t, 1 elsewhere (reverse-direction resets are shifted by the caller).
The selective-scan backward never stores (L, D, N): it recomputes each chunk's states from checkpoints that the
forward pass saves every ``T`` steps, (B, ceil(L/T), N, D).

Bitwise reproducibility: the kernels never let LLVM reorder or fuse floating-point operations (no ``reassoc`` or
``contract`` fast-math flags; see :data:`EXACT_MATH`). With those flags the machine code loaded from numba's on-disk
cache computed different last bits than the freshly compiled code (seen in the selective-scan backward: LLVM may
reorder such sums differently each time it optimises them), so training gave different losses depending on the
cache state. Products that should be fused are written as explicit :func:`fma` calls, and
sums across vector lanes as fixed pairwise trees (:func:`_lane_sum`), so every result has one exact definition.
"""

from __future__ import annotations

import math
import os

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .threads import PARALLEL_MIN_WORK, kernel_threads  # noqa: F401  (the one thread policy, re-exported)

# numba's OpenMP layer loads a second OpenMP runtime beside torch's; on 2 busy cores their spinning pools made small
# torch ops up to 1000x slower after the first kernel call. The workqueue layer has no such pool, but it aborts the
# process when two Python threads launch at once: every launch holds ssmkit.ops.threads.KERNEL_LOCK. An explicit
# NUMBA_THREADING_LAYER from the user wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    nb.config.THREADING_LAYER = "workqueue"

#: fast-math flags that let LLVM assume finite values but never change a result: no ``reassoc`` (reordering
#: sums), ``contract`` (fusing a*b+c), ``arcp`` or ``afn``, whose use depends on how the code was optimised
EXACT_MATH = {"nnan", "ninf"}


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (llvm.fma): the same bits on every compilation, unlike a contractible a*b+c.
    All three of one float type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                            f"llvm.fma.f{sig.return_type.bitwidth}")
        return builder.call(fn, args)

    return a(a, b, c), codegen


_F32_LOG2E = np.float32(1.4426950408889634)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(-2.12194440e-4)


@nb.njit(fastmath=EXACT_MATH, inline="always", cache=True)
def _exp32(v):
    """exp for float32 that LLVM can vectorise (numba's own exp is a scalar libm call here).

    Cody-Waite range reduction and a degree-6 polynomial; about 1.2e-7 relative error on [-87, 88].
    """
    v = min(max(v, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(v * _F32_LOG2E + np.float32(0.5))
    r = v - n * _F32_LN2_HI - n * _F32_LN2_LO
    p = np.float32(1.9875691500e-4)
    p = fma(p, r, np.float32(1.3981999507e-3))
    p = fma(p, r, np.float32(8.3334519073e-3))
    p = fma(p, r, np.float32(4.1665795894e-2))
    p = fma(p, r, np.float32(1.6666665459e-1))
    p = fma(p, r, np.float32(5.0000001201e-1))
    p = fma(p * r, r, r) + np.float32(1.0)
    scale = np.int32((np.int32(n) + np.int32(127)) << 23).view(np.float32)
    return p * scale


def fast_exp(v):
    """exp dispatched on dtype inside kernels: the vectorisable polynomial for float32, libm for float64."""
    return math.exp(v)


@overload(fast_exp, inline="always")
def _fast_exp_overload(v):
    if isinstance(v, types.Float) and v.bitwidth == 32:
        return lambda v: _exp32(v)
    return lambda v: math.exp(v)


@nb.njit(fastmath=EXACT_MATH, inline="always", cache=True)
def _softplus32(v):
    """softplus for float32 that LLVM can vectorise: max(v, 0) + log1p(exp(-|v|)), with log1p(a) for a in (0, 1]
    as 2 atanh(a / (2 + a)) by its odd series (no cancellation for small a); about 2e-7 relative error. Equals
    torch's softplus, which returns v itself above 20 (the log1p term is below float32 resolution there)."""
    a = _exp32(-abs(v))
    s = a / (np.float32(2.0) + a)
    z = s * s
    p = np.float32(1.0 / 15.0)
    p = fma(p, z, np.float32(1.0 / 13.0))
    p = fma(p, z, np.float32(1.0 / 11.0))
    p = fma(p, z, np.float32(1.0 / 9.0))
    p = fma(p, z, np.float32(1.0 / 7.0))
    p = fma(p, z, np.float32(1.0 / 5.0))
    p = fma(p, z, np.float32(1.0 / 3.0))
    p = fma(p, z, np.float32(1.0))
    return max(v, np.float32(0.0)) + np.float32(2.0) * s * p


def fast_softplus(v):
    """softplus dispatched on dtype inside kernels: the vectorisable form for float32, libm for float64."""
    return v if v > 20 else math.log1p(math.exp(v))


@overload(fast_softplus, inline="always")
def _fast_softplus_overload(v):
    if isinstance(v, types.Float) and v.bitwidth == 32:
        return lambda v: _softplus32(v)
    return lambda v: v if v > 20 else math.log1p(math.exp(v))


@nb.njit(fastmath=EXACT_MATH, inline="always", cache=True)
def _lane_sum(p):
    """sum(p) of a scratch vector of 64 lanes (SS_BLOCK) as a fixed pairwise tree: constant-length levels that
    vectorise without reordering anything; p is overwritten."""
    for j in range(32):
        p[j] += p[j + 32]
    for j in range(16):
        p[j] += p[j + 16]
    for j in range(8):
        p[j] += p[j + 8]
    for j in range(4):
        p[j] += p[j + 4]
    return (p[0] + p[2]) + (p[1] + p[3])


# ----------------------------------------------------------------------------------------------------------------
# Linear scan h_t = a_t h_{t-1} + b_t
# ----------------------------------------------------------------------------------------------------------------

_LS_BLOCK = 64


@nb.njit(parallel=True, fastmath=False, cache=True)
def linear_scan_fwd(a, b, h0, reverse, out):
    """out[:, t] = a[:, t] * out[:, t-1] + b[:, t]; returns nothing (final state is out at the last step)."""
    nb_, L, C = b.shape
    nblk = (C + _LS_BLOCK - 1) // _LS_BLOCK
    for task in nb.prange(nb_ * nblk):
        bi = task // nblk
        c0 = (task % nblk) * _LS_BLOCK
        c1 = min(c0 + _LS_BLOCK, C)
        h = h0[bi, c0:c1].copy()
        for i in range(L):
            t = L - 1 - i if reverse else i
            for j in range(c1 - c0):
                h[j] = a[bi, t, c0 + j] * h[j] + b[bi, t, c0 + j]
                out[bi, t, c0 + j] = h[j]


@nb.njit(parallel=True, fastmath=False, cache=True)
def linear_scan_bwd(a, h, h0, g, g_final, reverse, ga, gb, gh0):
    """Backward of linear_scan_fwd under PyTorch's conjugate convention.

    gh_t = g_t + conj(a_{t+1}) gh_{t+1};  ga_t = gh_t conj(h_{t-1});  gb_t = gh_t;  gh0 = conj(a_first) gh_first.
    """
    nb_, L, C = h.shape
    nblk = (C + _LS_BLOCK - 1) // _LS_BLOCK
    for task in nb.prange(nb_ * nblk):
        bi = task // nblk
        c0 = (task % nblk) * _LS_BLOCK
        c1 = min(c0 + _LS_BLOCK, C)
        carry = g_final[bi, c0:c1].copy()
        for i in range(L - 1, -1, -1):
            t = L - 1 - i if reverse else i
            tp = t + 1 if reverse else t - 1
            for j in range(c1 - c0):
                c = c0 + j
                gh = g[bi, t, c] + carry[j]
                gb[bi, t, c] = gh
                hp = h0[bi, c] if i == 0 else h[bi, tp, c]
                ga[bi, t, c] = gh * np.conj(hp)
                carry[j] = np.conj(a[bi, t, c]) * gh
        for j in range(c1 - c0):
            gh0[bi, c0 + j] = carry[j]


# ----------------------------------------------------------------------------------------------------------------
# Selective scan (S6), fused with the D skip and the silu(z) gate
# ----------------------------------------------------------------------------------------------------------------

SS_BLOCK = 64  # channels per task: a compile-time lane count (_lane_sum sums 64); short blocks get inert zero lanes
SS_CHUNK = 32  # steps between state checkpoints


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def selective_fwd(u, dt, At, Bm, Cm, Dv, z, keep, h0, blocks, parts, dbias, softplus, reverse, has_D, has_z, save_ck,
                  ck, out, hT):
    """out = (C.h + D u) * silu(z) with h_t = exp(dt_t A) h_{t-1} keep_t + dt_t B_t u_t; hT = final state;
    ck[:, c] = the state before step c * SS_CHUNK (when ``save_ck``). Padded lanes (beyond a block's width) carry
    dt = u = A = 0 (the per-step scratch is zeroed beyond each block's width, since blocks of one task can differ in
    width), so their state stays exactly 0.

    Channel blocks of SS_BLOCK lanes; each task owns a contiguous range of blocks (``parts[p]:parts[p + 1]``)
    and sweeps time in tiles of SS_CHUNK steps, running every block of its range over a tile before the next
    tile: a tile's rows of u, dt and z are read whole (a few KB, contiguous) by consecutive blocks rather than
    one 256-byte slice per row (a new page per step), and the states of all its blocks stay in L2 (1.4x faster
    than one task per block over all steps at L=16384). The step size is ``dt + dbias`` (dbias: (dim,)), passed through
    softplus (torch's: identity above 20) when ``softplus``, so inference needs no separate pass for them."""
    nbat, L, _ = u.shape
    N = At.shape[0]
    W = SS_BLOCK
    T = SS_CHUNK
    nparts = parts.shape[0] - 1
    one = np.ones(1, dtype=u.dtype)[0]
    for task in nb.prange(nbat * nparts):
        bi = task // nparts
        p0 = parts[task % nparts]
        nk = parts[task % nparts + 1] - p0
        h = np.zeros((nk, N, W), dtype=u.dtype)
        Ab = np.zeros((nk, N, W), dtype=u.dtype)
        dtj = np.zeros(W, dtype=u.dtype)
        duj = np.zeros(W, dtype=u.dtype)
        yj = np.zeros(W, dtype=u.dtype)
        for k in range(nk):
            d0 = blocks[p0 + k, 0]
            for n in range(N):
                for j in range(blocks[p0 + k, 1]):
                    h[k, n, j] = h0[bi, n, d0 + j]
                    Ab[k, n, j] = At[n, d0 + j]
        for c0 in range(0, L, T):
            c1 = min(L, c0 + T)
            for k in range(nk):
                d0 = blocks[p0 + k, 0]
                w = blocks[p0 + k, 1]
                g = blocks[p0 + k, 2]
                if save_ck:
                    for n in range(N):
                        for j in range(w):
                            ck[bi, c0 // T, n, d0 + j] = h[k, n, j]
                for i in range(c0, c1):
                    t = L - 1 - i if reverse else i
                    kp = keep[bi, t]
                    for j in range(w):
                        v = dt[bi, t, d0 + j] + dbias[d0 + j]
                        if softplus:
                            v = fast_softplus(v)
                        dtj[j] = v
                        duj[j] = v * u[bi, t, d0 + j]
                    for j in range(w, W):
                        dtj[j] = 0.0
                        duj[j] = 0.0
                    for j in range(W):
                        yj[j] = 0.0
                    for n in range(N):
                        bn = Bm[bi, t, g, n]
                        cn = Cm[bi, t, g, n]
                        for j in range(W):
                            hv = fma(fast_exp(dtj[j] * Ab[k, n, j]) * h[k, n, j], kp, duj[j] * bn)
                            h[k, n, j] = hv
                            yj[j] = fma(cn, hv, yj[j])
                    for j in range(w):
                        y = yj[j]
                        if has_D:
                            y = fma(Dv[d0 + j], u[bi, t, d0 + j], y)
                        if has_z:
                            zz = z[bi, t, d0 + j]
                            y *= zz / (one + fast_exp(-zz))
                        out[bi, t, d0 + j] = y
        for k in range(nk):
            d0 = blocks[p0 + k, 0]
            for n in range(N):
                for j in range(blocks[p0 + k, 1]):
                    hT[bi, n, d0 + j] = h[k, n, j]


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def selective_bwd(u, dt, At, Bm, Cm, Dv, z, keep, ck, blocks, stripes, dbias, softplus, reverse, has_D, has_z, gout,
                  ghT, gu, gdt, gz, gA_part, gD_part, gbias_part, gB_part, gC_part, gh0):
    """Reverse-time pass. Each task owns one stripe of channel blocks of one (batch, group) and processes them one
    after another, so its partial sums of gB/gC over channels need no atomics. Each chunk's states are recomputed
    from its checkpoint into a (T+1, N, W) buffer, with the decays exp(dt A) (times keep) into a (T, N, W) one, so
    the walk backwards takes no exp. ``dt`` is the raw step input: the step size is ``softplus(dt + dbias)`` when
    ``softplus``, else ``dt + dbias`` (as in :func:`selective_fwd`); gdt is the gradient for the raw input and
    gbias_part (batch, dim) its sum over time.

    Per step and state index n, with gh the state gradient after the output term is added (ghn) and a = exp(dt A)
    keep h_{t-1}: gA += ghn a dt; gdt += ghn a A (+ u sum_n ghn B_n); gu += dt sum_n ghn B_n (+ gy D);
    gB_n = sum_d ghn dt u; gC_n = sum_d gy h_t; gh <- ghn exp(dt A) keep."""
    nbat, L, _ = u.shape
    N = At.shape[0]
    W = SS_BLOCK
    T = SS_CHUNK
    nchunk = ck.shape[1]
    nstripe = stripes.shape[0]
    one = np.ones(1, dtype=u.dtype)[0]
    for task in nb.prange(nbat * nstripe):
        bi = task // nstripe
        sidx = task % nstripe
        g = stripes[sidx, 0]
        part = stripes[sidx, 1]
        hs = np.zeros((T + 1, N, W), dtype=u.dtype)
        dAk = np.zeros((T, N, W), dtype=u.dtype)
        gh = np.zeros((N, W), dtype=u.dtype)
        Ab = np.zeros((N, W), dtype=u.dtype)
        gAb = np.zeros((N, W), dtype=u.dtype)
        dtc = np.zeros((T, W), dtype=u.dtype)
        sgc = np.zeros((T, W), dtype=u.dtype)  # d(step size)/d(raw dt): sigmoid under softplus, else 1
        uc = np.zeros((T, W), dtype=u.dtype)
        duc = np.zeros((T, W), dtype=u.dtype)
        gyj = np.zeros(W, dtype=u.dtype)
        gdtj = np.zeros(W, dtype=u.dtype)
        sBj = np.zeros(W, dtype=u.dtype)
        gDb = np.zeros(W, dtype=u.dtype)
        gbb = np.zeros(W, dtype=u.dtype)
        pB = np.zeros(W, dtype=u.dtype)  # per-lane terms of the gB and gC sums over channels
        pC = np.zeros(W, dtype=u.dtype)
        for blk in range(stripes[sidx, 2], stripes[sidx, 3]):
            d0 = blocks[blk, 0]
            w = blocks[blk, 1]
            gh[:, :] = 0.0
            Ab[:, :] = 0.0
            gAb[:, :] = 0.0
            dtc[:, :] = 0.0
            sgc[:, :] = 0.0
            uc[:, :] = 0.0
            duc[:, :] = 0.0
            gDb[:] = 0.0
            gbb[:] = 0.0
            hs[:, :, :] = 0.0
            for n in range(N):
                for j in range(w):
                    gh[n, j] = ghT[bi, n, d0 + j]
                    Ab[n, j] = At[n, d0 + j]
            for c in range(nchunk - 1, -1, -1):
                i0 = c * T
                i1 = min(i0 + T, L)
                # gather the chunk's step sizes and u, then recompute its states and decays from the checkpoint
                for i in range(i0, i1):
                    t = L - 1 - i if reverse else i
                    for j in range(w):
                        v = dt[bi, t, d0 + j] + dbias[d0 + j]
                        if softplus:
                            sgc[i - i0, j] = one / (one + fast_exp(-v)) if v <= 20 else one
                            v = fast_softplus(v)
                        else:
                            sgc[i - i0, j] = one
                        dtc[i - i0, j] = v
                        uc[i - i0, j] = u[bi, t, d0 + j]
                        duc[i - i0, j] = v * u[bi, t, d0 + j]
                for n in range(N):
                    for j in range(w):
                        hs[0, n, j] = ck[bi, c, n, d0 + j]
                for i in range(i0, i1):
                    t = L - 1 - i if reverse else i
                    kp = keep[bi, t]
                    k = i - i0
                    for n in range(N):
                        bn = Bm[bi, t, g, n]
                        for j in range(W):
                            e = fast_exp(dtc[k, j] * Ab[n, j])
                            dAk[k, n, j] = e * kp
                            hs[k + 1, n, j] = fma(e * hs[k, n, j], kp, duc[k, j] * bn)
                for i in range(i1 - 1, i0 - 1, -1):
                    t = L - 1 - i if reverse else i
                    k = i - i0
                    for j in range(W):
                        gdtj[j] = 0.0
                        sBj[j] = 0.0
                        gyj[j] = 0.0
                    if has_z:
                        # the gate's gradient needs y = C.h + D u
                        for n in range(N):
                            cn = Cm[bi, t, g, n]
                            for j in range(W):
                                gyj[j] = fma(cn, hs[k + 1, n, j], gyj[j])
                        for j in range(w):
                            y = gyj[j]
                            if has_D:
                                y = fma(Dv[d0 + j], uc[k, j], y)
                            zz = z[bi, t, d0 + j]
                            sg = one / (one + fast_exp(-zz))
                            go = gout[bi, t, d0 + j]
                            gz[bi, t, d0 + j] = go * y * sg * (one + zz * (one - sg))
                            gyj[j] = go * zz * sg
                        for j in range(w, W):
                            gyj[j] = 0.0
                    else:
                        for j in range(w):
                            gyj[j] = gout[bi, t, d0 + j]
                    for n in range(N):
                        bn = Bm[bi, t, g, n]
                        cn = Cm[bi, t, g, n]
                        for j in range(W):
                            ghn = fma(gyj[j], cn, gh[n, j])
                            pC[j] = gyj[j] * hs[k + 1, n, j]
                            ga = ghn * (dAk[k, n, j] * hs[k, n, j])
                            gdtj[j] = fma(ga, Ab[n, j], gdtj[j])
                            gAb[n, j] = fma(ga, dtc[k, j], gAb[n, j])
                            sBj[j] = fma(ghn, bn, sBj[j])
                            pB[j] = ghn * duc[k, j]
                            gh[n, j] = ghn * dAk[k, n, j]
                        gB_part[part, bi, t, g, n] += _lane_sum(pB)
                        gC_part[part, bi, t, g, n] += _lane_sum(pC)
                    for j in range(w):
                        gv = fma(sBj[j], uc[k, j], gdtj[j]) * sgc[k, j]
                        gdt[bi, t, d0 + j] = gv
                        gbb[j] += gv
                        gu_ = sBj[j] * dtc[k, j]
                        if has_D:
                            gDb[j] = fma(gyj[j], uc[k, j], gDb[j])
                            gu_ = fma(gyj[j], Dv[d0 + j], gu_)
                        gu[bi, t, d0 + j] = gu_
            for n in range(N):
                for j in range(w):
                    gh0[bi, n, d0 + j] = gh[n, j]
                    gA_part[bi, n, d0 + j] = gAb[n, j]
            for j in range(w):
                gD_part[bi, d0 + j] = gDb[j]
                gbias_part[bi, d0 + j] = gbb[j]

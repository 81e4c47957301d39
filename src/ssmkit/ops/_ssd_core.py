"""The factored SSD's core as one autograd node: the GEMMs in torch, the elementwise passes fused (numba, CPU).

    y, hT = factored_core(x, fw, e, skip, CB, Bs, Cs, tot, rin, rout, h0)

Shapes (bc = batch * chunks, bcg = bc * groups): x (bc, Q, G, R, P); fw, e, skip (bc, Q, G, R); CB (bcg, Q, Q);
Bs, Cs (bcg, Q, N); tot, rin, rout (batch, chunks, G, R); h0 (batch, G, N, R, P) or None. Computes

    X' = fw x  (laid out (bc, G, Q, R, P));  U = Bs^T X';  (k, hT) = scaled state pass (U, tot, rin, rout, h0);
    Y = CB X' + Cs k;  y = e Y + skip x  (in x's layout)

and the gradients of every input by hand: two fused sweeps over (length, heads, head_dim) in the backward (one
before the GEMMs: g_Y, g_e, g_skip; one after: g_x, g_fw) instead of autograd's ~10 passes of products, sums and
additions, and g_X' from its two GEMMs summed in place. Sums over head_dim run in a fixed order (fma).
The elementwise sweeps are serial (memory-bound; a parallel numba kernel compiles ~10x slower, 3-7 s each per
dtype); the state pass parallelises over (batch, group, block of state rows) as before.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from torch import Tensor

from ._numba_kernels import EXACT_MATH, fma
from ._ssd_state import scaled_pass_bwd, scaled_pass_fwd


@nb.njit(fastmath=EXACT_MATH, cache=True)
def scale_in(x, fw, Xp):
    """Xp[i, g, q, r] = fw[i, q, g, r] x[i, q, g, r]."""
    bc, Q, G, R, P = x.shape
    for i in range(bc):
        for q in range(Q):
            for g in range(G):
                for r in range(R):
                    w = fw[i, q, g, r]
                    for p in range(P):
                        Xp[i, g, q, r, p] = w * x[i, q, g, r, p]


@nb.njit(fastmath=EXACT_MATH, cache=True)
def scale_out(Y, e, x, skip, y):
    """y[i, q, g, r] = e[i, q, g, r] Y[i, g, q, r] + skip[i, q, g, r] x[i, q, g, r] (one fma)."""
    bc, Q, G, R, P = x.shape
    for i in range(bc):
        for q in range(Q):
            for g in range(G):
                for r in range(R):
                    a, s = e[i, q, g, r], skip[i, q, g, r]
                    for p in range(P):
                        y[i, q, g, r, p] = fma(a, Y[i, g, q, r, p], s * x[i, q, g, r, p])


@nb.njit(fastmath=EXACT_MATH, cache=True)
def scale_out_bwd(gy, Y, e, x, gY, ge, gskip):
    """gY = e gy (Y's layout); ge = sum_p gy Y; gskip = sum_p gy x."""
    bc, Q, G, R, P = x.shape
    zero = np.zeros(1, dtype=x.dtype)[0]
    for i in range(bc):
        for q in range(Q):
            for g in range(G):
                for r in range(R):
                    a = e[i, q, g, r]
                    s1 = zero
                    s2 = zero
                    for p in range(P):
                        v = gy[i, q, g, r, p]
                        gY[i, g, q, r, p] = a * v
                        s1 = fma(v, Y[i, g, q, r, p], s1)
                        s2 = fma(v, x[i, q, g, r, p], s2)
                    ge[i, q, g, r] = s1
                    gskip[i, q, g, r] = s2


@nb.njit(fastmath=EXACT_MATH, cache=True)
def scale_in_bwd(gy, skip, gXp, fw, x, gx, gfw):
    """gx = skip gy + fw gXp (one fma, x's layout); gfw = sum_p gXp x."""
    bc, Q, G, R, P = x.shape
    zero = np.zeros(1, dtype=x.dtype)[0]
    for i in range(bc):
        for q in range(Q):
            for g in range(G):
                for r in range(R):
                    s, w = skip[i, q, g, r], fw[i, q, g, r]
                    acc = zero
                    for p in range(P):
                        v = gXp[i, g, q, r, p]
                        gx[i, q, g, r, p] = fma(w, v, s * gy[i, q, g, r, p])
                        acc = fma(v, x[i, q, g, r, p], acc)
                    gfw[i, q, g, r] = acc


def _np(*ts: Tensor):
    return [t.numpy() for t in ts]


class _Core(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fw, e, skip, CB, Bs, Cs, tot, rin, rout, h0):
        x, fw, e, skip, CB, Bs, Cs, tot, rin, rout = (
            t.detach().contiguous() for t in (x, fw, e, skip, CB, Bs, Cs, tot, rin, rout))
        bc, Q, G, R, P = x.shape
        bcg, N = bc * G, Bs.shape[-1]
        Xp = x.new_empty(bc, G, Q, R, P)
        scale_in(*_np(x, fw, Xp))
        Xv = Xp.view(bcg, Q, R * P)
        U = torch.bmm(Bs.transpose(1, 2), Xv)
        k, hT = scaled_pass_fwd(U.view(*tot.shape[:3], N, R, P), tot, rin, rout,
                                None if h0 is None else h0.detach())
        Y = torch.bmm(CB, Xv).baddbmm_(Cs, k.view(bcg, N, R * P))
        y = torch.empty_like(x)
        scale_out(*_np(Y.view(bc, G, Q, R, P), e, x, skip, y))
        ctx.has_h0 = h0 is not None
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, fw, e, skip, CB, Bs, Cs, tot, rin, rout, Xp, U, k, Y)
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        x, fw, e, skip, CB, Bs, Cs, tot, rin, rout, Xp, U, k, Y = ctx.saved_tensors
        bc, Q, G, R, P = x.shape
        bcg, N = bc * G, Bs.shape[-1]
        gy = torch.zeros_like(x) if gy is None else gy.contiguous()
        gY, ge, gskip = torch.empty_like(Y), torch.empty_like(e), torch.empty_like(skip)
        scale_out_bwd(*_np(gy, Y.view(bc, G, Q, R, P), e, x, gY.view(bc, G, Q, R, P), ge, gskip))
        Xv, kv = Xp.view(bcg, Q, R * P), k.view(bcg, N, R * P)
        gCB = torch.bmm(gY, Xv.transpose(1, 2))
        gCs = torch.bmm(gY, kv.transpose(1, 2))
        gk = torch.bmm(Cs.transpose(1, 2), gY)
        gU, gtot, grin, grout, gh0 = scaled_pass_bwd(U.view(k.shape), tot, rin, rout, k, gk.view(k.shape), ghT)
        gU = gU.view(bcg, N, R * P)
        gXp = torch.bmm(CB.transpose(1, 2), gY).baddbmm_(Bs, gU)
        gBs = torch.bmm(Xv, gU.transpose(1, 2))
        gx, gfw = torch.empty_like(x), torch.empty_like(fw)
        scale_in_bwd(*_np(gy, skip, gXp.view(bc, G, Q, R, P), fw, x, gx, gfw))
        return gx, gfw, ge, gskip, gCB, gBs, gCs, gtot, grin, grout, gh0 if ctx.has_h0 else None


def factored_core(x: Tensor, fw: Tensor, e: Tensor, skip: Tensor, CB: Tensor, Bs: Tensor, Cs: Tensor, tot: Tensor,
                  rin: Tensor, rout: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """See the module docstring; every tensor CPU float32 or float64 of one dtype (the caller checks)."""
    return _Core.apply(x, fw, e, skip, CB, Bs, Cs, tot, rin, rout, h0)

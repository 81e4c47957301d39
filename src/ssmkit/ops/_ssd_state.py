"""SSD's pass over the chunk states, fused (numba, CPU): the states entering every chunk in one sweep.

    entering, hT = state_pass(S, total, h0)

h_0 = h0; h_{c+1} = total_c h_c + S_c; entering[:, c] = h_c; hT = h_chunks. Shapes: S (b, c, G, N, R, P) the
chunks' own end states, total (b, c, G, R) each chunk's whole decay per head (heads = G * R), h0 (b, G, N, R, P)
or None (zeros); entering like S, hT like h0. One task per (batch, group, head) walks the chunks in order, so no
per-chunk tensors, stack or autograd nodes are made (a Python loop over 512 chunks of a 32,768-token piece made
~2,000 small ops per backward), and the backward is one reverse sweep:
g_h <- g_hT; for c from last to first: g_S_c = g_h, g_total_c = sum_{n,p} g_h h_c, g_h <- total_c g_h + g_entering_c;
g_h0 = g_h. Every element is computed by one task in one fixed order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from torch import Tensor

from ._numba_kernels import EXACT_MATH, fma
from .threads import kernel_threads


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_state_fwd(S, tot, h0, ent, hT):
    """ent[:, c] = h_c, h_{c+1} = tot_c h_c + S_c (one rounding, fma), h_0 = h0; hT = h after the last chunk."""
    nbat, nc, G, N, R, P = S.shape
    for task in nb.prange(nbat * G * R):
        bi = task // (G * R)
        gi = (task // R) % G
        r = task % R
        h = np.empty((N, P), dtype=S.dtype)
        for n in range(N):
            for p in range(P):
                h[n, p] = h0[bi, gi, n, r, p]
        for c in range(nc):
            t = tot[bi, c, gi, r]
            for n in range(N):
                for p in range(P):
                    v = h[n, p]
                    ent[bi, c, gi, n, r, p] = v
                    h[n, p] = fma(t, v, S[bi, c, gi, n, r, p])
        for n in range(N):
            for p in range(P):
                hT[bi, gi, n, r, p] = h[n, p]


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_state_bwd(tot, ent, gent, ghT, gS, gtot, gh0):
    """The reverse sweep of :func:`ssd_state_fwd` (see the module docstring); gtot's sum over (n, p) is kept per
    lane p over n, then summed over p in order."""
    nbat, nc, G, N, R, P = ent.shape
    for task in nb.prange(nbat * G * R):
        bi = task // (G * R)
        gi = (task // R) % G
        r = task % R
        gh = np.empty((N, P), dtype=ent.dtype)
        acc = np.empty(P, dtype=ent.dtype)
        for n in range(N):
            for p in range(P):
                gh[n, p] = ghT[bi, gi, n, r, p]
        for c in range(nc - 1, -1, -1):
            t = tot[bi, c, gi, r]
            acc[:] = 0.0
            for n in range(N):
                for p in range(P):
                    g = gh[n, p]
                    gS[bi, c, gi, n, r, p] = g
                    acc[p] = fma(g, ent[bi, c, gi, n, r, p], acc[p])
                    gh[n, p] = fma(t, g, gent[bi, c, gi, n, r, p])
            s = acc[0]
            for p in range(1, P):
                s += acc[p]
            gtot[bi, c, gi, r] = s
        for n in range(N):
            for p in range(P):
                gh0[bi, gi, n, r, p] = gh[n, p]


class _StatePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: Tensor, tot: Tensor, h0: Tensor | None):
        S_, tot_ = S.detach().contiguous(), tot.detach().contiguous()
        batch, _, G, N, R, P = S_.shape
        h0_ = S_.new_zeros(batch, G, N, R, P) if h0 is None else h0.detach().contiguous()
        ent, hT = torch.empty_like(S_), torch.empty_like(h0_)
        with kernel_threads(S_.numel()):
            ssd_state_fwd(S_.numpy(), tot_.numpy(), h0_.numpy(), ent.numpy(), hT.numpy())
        ctx.has_h0 = h0 is not None
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(tot_, ent)
        return ent, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gent: Tensor | None, ghT: Tensor | None):
        tot, ent = ctx.saved_tensors
        batch, _, G, N, R, P = ent.shape
        gent = torch.zeros_like(ent) if gent is None else gent.contiguous()
        ghT = ent.new_zeros(batch, G, N, R, P) if ghT is None else ghT.contiguous()
        gS, gtot, gh0 = torch.empty_like(ent), torch.empty_like(tot), torch.empty_like(ghT)
        with kernel_threads(ent.numel()):
            ssd_state_bwd(tot.numpy(), ent.numpy(), gent.numpy(), ghT.numpy(), gS.numpy(), gtot.numpy(),
                          gh0.numpy())
        return gS, gtot, gh0 if ctx.has_h0 else None


def state_pass(S: Tensor, total: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """The states entering each chunk and the final state (see the module docstring); CPU float32/float64,
    differentiable in S, total and h0. S (b, c, G, N, R, P); total (b, c, G, R); h0 (b, G, N, R, P) or None."""
    if S.ndim != 6:
        raise ValueError(f"S must be (batch, chunks, groups, N, heads per group, head_dim), got {tuple(S.shape)}")
    b, c, G, N, R, P = S.shape
    if tuple(total.shape) != (b, c, G, R):
        raise ValueError(f"total must have shape {(b, c, G, R)} (batch, chunks, groups, heads per group), "
                         f"got {tuple(total.shape)}")
    if h0 is not None and tuple(h0.shape) != (b, G, N, R, P):
        raise ValueError(f"h0 must have shape {(b, G, N, R, P)}, got {tuple(h0.shape)}")
    for name, t in (("total", total), ("h0", h0)):
        if t is not None and t.dtype != S.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but S has {S.dtype}; pass one dtype")
    if S.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"S must be float32 or float64 for the fused state pass, got {S.dtype}")
    return _StatePass.apply(S, total, h0)

"""SSD's pass over the chunk states, fused (numba, CPU): the states entering every chunk in one sweep.

    entering, hT = state_pass(S, total, h0)

h_0 = h0; h_{c+1} = total_c h_c + S_c; entering[:, c] = h_c; hT = h_chunks. Shapes: S (b, c, G, N, R, P) the
chunks' own end states, total (b, c, G, R) each chunk's whole decay per head (heads = G * R), h0 (b, G, N, R, P)
or None (zeros); entering like S, hT like h0. One task per (batch, group, block of state rows) walks the chunks in
order over its rows' contiguous (heads, head_dim) blocks, so no per-chunk tensors, stack or autograd nodes are made
(a Python loop over 512 chunks of a 32,768-token piece made ~2,000 small ops per backward), and the backward is one
reverse sweep: g_h <- g_hT; for c from last to first: g_S_c = g_h, g_total_c = sum_{n,p} g_h h_c,
g_h <- total_c g_h + g_entering_c; g_h0 = g_h. Every element is computed by one task in one fixed order and the
blocks' parts of g_total are added in block order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from torch import Tensor

from ._numba_kernels import EXACT_MATH, fma
from .threads import kernel_threads

#: state rows (N) per task: a task sweeps its rows' (heads, head_dim) blocks of S contiguously, chunk after chunk
ROWS = 16


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_state_fwd(S, tot, h0, ent, hT):
    """ent[:, c] = h_c, h_{c+1} = tot_c h_c + S_c (one rounding, fma), h_0 = h0; hT = h after the last chunk.
    One task per (batch, group, block of ROWS state rows)."""
    nbat, nc, G, N, R, P = S.shape
    nblk = (N + ROWS - 1) // ROWS
    for task in nb.prange(nbat * G * nblk):
        bi = task // (G * nblk)
        gi = (task // nblk) % G
        n0 = (task % nblk) * ROWS
        n1 = min(N, n0 + ROWS)
        h = np.empty((n1 - n0, R, P), dtype=S.dtype)
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    h[n - n0, r, p] = h0[bi, gi, n, r, p]
        for c in range(nc):
            for n in range(n0, n1):
                for r in range(R):
                    t = tot[bi, c, gi, r]
                    for p in range(P):
                        v = h[n - n0, r, p]
                        ent[bi, c, gi, n, r, p] = v
                        h[n - n0, r, p] = fma(t, v, S[bi, c, gi, n, r, p])
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    hT[bi, gi, n, r, p] = h[n - n0, r, p]


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_state_bwd(tot, ent, gent, ghT, gS, gtot_part, gh0):
    """The reverse sweep of :func:`ssd_state_fwd` (see the module docstring), one task per (batch, group, block of
    ROWS rows) as there; gtot_part[blk] holds the block's part of g_total (summed over its rows in order, per lane
    p, then over p in order); the caller adds the blocks in order."""
    nbat, nc, G, N, R, P = ent.shape
    nblk = (N + ROWS - 1) // ROWS
    for task in nb.prange(nbat * G * nblk):
        bi = task // (G * nblk)
        gi = (task // nblk) % G
        blk = task % nblk
        n0 = blk * ROWS
        n1 = min(N, n0 + ROWS)
        gh = np.empty((n1 - n0, R, P), dtype=ent.dtype)
        acc = np.empty((R, P), dtype=ent.dtype)
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    gh[n - n0, r, p] = ghT[bi, gi, n, r, p]
        for c in range(nc - 1, -1, -1):
            acc[:, :] = 0.0
            for n in range(n0, n1):
                for r in range(R):
                    t = tot[bi, c, gi, r]
                    for p in range(P):
                        g = gh[n - n0, r, p]
                        gS[bi, c, gi, n, r, p] = g
                        acc[r, p] = fma(g, ent[bi, c, gi, n, r, p], acc[r, p])
                        gh[n - n0, r, p] = fma(t, g, gent[bi, c, gi, n, r, p])
            for r in range(R):
                s = acc[r, 0]
                for p in range(1, P):
                    s += acc[r, p]
                gtot_part[blk, bi, c, gi, r] = s
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    gh0[bi, gi, n, r, p] = gh[n - n0, r, p]


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
        gS, gh0 = torch.empty_like(ent), torch.empty_like(ghT)
        parts = torch.empty((-(-N // ROWS), *tot.shape), dtype=tot.dtype)
        with kernel_threads(ent.numel()):
            ssd_state_bwd(tot.numpy(), ent.numpy(), gent.numpy(), ghT.numpy(), gS.numpy(), parts.numpy(),
                          gh0.numpy())
        gtot = parts[0].clone()
        for part in parts[1:]:  # in block order: the same sum on any thread count
            gtot += part
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

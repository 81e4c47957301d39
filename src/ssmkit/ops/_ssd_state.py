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

The scaled variant (:func:`scaled_pass_fwd` / :func:`scaled_pass_bwd`, for the factored path of
:mod:`._ssd_factored`): h_{c+1} = tot_c h_c + rin_c U_c with the output k_c = rout_c h_c.
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


# ------------------------------------------------------------------------------------------ scaled variant
@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_scaled_fwd(U, tot, rin, rout, h0, k, hT):
    """k[:, c] = rout_c h_c, h_{c+1} = tot_c h_c + rin_c U_c (fma), h_0 = h0; hT = h after the last chunk.
    Tasks as in :func:`ssd_state_fwd`; tot, rin, rout (b, c, G, R)."""
    nbat, nc, G, N, R, P = U.shape
    nblk = (N + ROWS - 1) // ROWS
    for task in nb.prange(nbat * G * nblk):
        bi = task // (G * nblk)
        gi = (task // nblk) % G
        n0 = (task % nblk) * ROWS
        n1 = min(N, n0 + ROWS)
        h = np.empty((n1 - n0, R, P), dtype=U.dtype)
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    h[n - n0, r, p] = h0[bi, gi, n, r, p]
        for c in range(nc):
            for n in range(n0, n1):
                for r in range(R):
                    t, ri, ro = tot[bi, c, gi, r], rin[bi, c, gi, r], rout[bi, c, gi, r]
                    for p in range(P):
                        v = h[n - n0, r, p]
                        k[bi, c, gi, n, r, p] = ro * v
                        h[n - n0, r, p] = fma(t, v, ri * U[bi, c, gi, n, r, p])
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    hT[bi, gi, n, r, p] = h[n - n0, r, p]


@nb.njit(parallel=True, fastmath=EXACT_MATH, cache=True)
def ssd_scaled_bwd(U, tot, rin, rout, k, gk, ghT, gU, parts, gh0):
    """The reverse sweep of :func:`ssd_scaled_fwd`: g_U_c = rin_c g_h, and per (block, batch, chunk, group, head)
    parts[0/1/2] = the block's part of g_tot = <g_h, h_c>, g_rin = <g_h, U_c>, g_rout = <g_k, h_c>, with
    g_h the gradient of h_{c+1}; <., h_c> is accumulated against k_c = rout_c h_c and divided by rout_c once.
    Then g_h <- tot_c g_h + rout_c g_k_c; g_h0 = g_h."""
    nbat, nc, G, N, R, P = U.shape
    nblk = (N + ROWS - 1) // ROWS
    for task in nb.prange(nbat * G * nblk):
        bi = task // (G * nblk)
        gi = (task // nblk) % G
        blk = task % nblk
        n0 = blk * ROWS
        n1 = min(N, n0 + ROWS)
        gh = np.empty((n1 - n0, R, P), dtype=U.dtype)
        acc = np.empty((3, R, P), dtype=U.dtype)
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    gh[n - n0, r, p] = ghT[bi, gi, n, r, p]
        for c in range(nc - 1, -1, -1):
            acc[:, :, :] = 0.0
            for n in range(n0, n1):
                for r in range(R):
                    t, ri, ro = tot[bi, c, gi, r], rin[bi, c, gi, r], rout[bi, c, gi, r]
                    for p in range(P):
                        g = gh[n - n0, r, p]
                        kv = k[bi, c, gi, n, r, p]
                        gkv = gk[bi, c, gi, n, r, p]
                        gU[bi, c, gi, n, r, p] = ri * g
                        acc[0, r, p] = fma(g, kv, acc[0, r, p])
                        acc[1, r, p] = fma(g, U[bi, c, gi, n, r, p], acc[1, r, p])
                        acc[2, r, p] = fma(gkv, kv, acc[2, r, p])
                        gh[n - n0, r, p] = fma(t, g, ro * gkv)
            for r in range(R):
                ro = rout[bi, c, gi, r]
                for j in range(3):
                    s = acc[j, r, 0]
                    for p in range(1, P):
                        s += acc[j, r, p]
                    parts[j, blk, bi, c, gi, r] = s / ro if j != 1 else s
        for n in range(n0, n1):
            for r in range(R):
                for p in range(P):
                    gh0[bi, gi, n, r, p] = gh[n - n0, r, p]


def scaled_pass_fwd(U: Tensor, tot: Tensor, rin: Tensor, rout: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`ssd_scaled_fwd` on contiguous tensors (no autograd): returns (k, hT)."""
    batch, _, G, N, R, P = U.shape
    h0 = U.new_zeros(batch, G, N, R, P) if h0 is None else h0.contiguous()
    k, hT = torch.empty_like(U), torch.empty_like(h0)
    with kernel_threads(U.numel()):
        ssd_scaled_fwd(U.numpy(), tot.numpy(), rin.numpy(), rout.numpy(), h0.numpy(), k.numpy(), hT.numpy())
    return k, hT


def scaled_pass_bwd(U: Tensor, tot: Tensor, rin: Tensor, rout: Tensor, k: Tensor, gk: Tensor | None,
                    ghT: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`ssd_scaled_bwd` (no autograd): returns the gradients of (U, tot, rin, rout, h0)."""
    batch, _, G, N, R, P = U.shape
    gk = torch.zeros_like(k) if gk is None else gk.contiguous()
    ghT = U.new_zeros(batch, G, N, R, P) if ghT is None else ghT.contiguous()
    gU, gh0 = torch.empty_like(U), torch.empty_like(ghT)
    parts = torch.empty((3, -(-N // ROWS), *tot.shape), dtype=tot.dtype)
    with kernel_threads(U.numel()):
        ssd_scaled_bwd(U.numpy(), tot.numpy(), rin.numpy(), rout.numpy(), k.numpy(), gk.numpy(), ghT.numpy(),
                       gU.numpy(), parts.numpy(), gh0.numpy())
    grads = []
    for j in range(3):  # blocks added in order: the same sums on any thread count
        acc = parts[j, 0].clone()
        for part in parts[j, 1:]:
            acc += part
        grads.append(acc)
    return gU, *grads, gh0

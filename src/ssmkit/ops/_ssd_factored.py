"""SSD's chunked algorithm with the decays factored per position: no (chunk, chunk) matrix per head.

Inside a chunk the decay from s to t <= s is exp(acs_t - acs_s) = e_t f_s with e_t = exp(acs_t - m) and
f_s = exp(m - acs_s), acs the running sums of the log decays and m a centre per (chunk, head). So

    y_t = e_t [ sum_{s<=t} (C_t . B_s) X'_s + C_t . k_c ] + D x_t,   X'_s = f_s dt_s x_s,
    S_c = rin_c B^T X',   h_{c+1} = tot_c h_c + S_c,   k_c = rout_c h_c,

with rin = exp(acs_end - m), rout = exp(m), tot = exp(acs_end). The heads of a group share C B^T (Q x Q), so the
within-chunk product is one (Q, Q) x (Q, heads * head_dim) GEMM per chunk and group, X' feeds both it and the chunk
states, and the only elementwise passes over (length, heads, head_dim) are X', the scaling by e and the D skip:
no per-head decay matrices, segment sums or their exps (forward or backward). Those passes, the state recurrence
and the rin / rout scalings run in fused numba sweeps, forward and backward (:mod:`._ssd_core`). The diagonal
C_t . B_t dt_t (decay exactly 1) is added to the D skip rather than factored, so the gradient w.r.t. the decays
does not carry two large terms cancelling to rounding noise (for chunk size 1 the segment-sum path runs).

The factors are exact as long as they stay normal: m is the middle of the chunk's range of acs (0 included),
so every factor lies in exp(+-range / 2). A piece where some chunk's range exceeds 2 |log sqrt(tiny)| (87 in
float32, 708 in float64) returns None; the caller (``ops.ssd``) asks :func:`factored_heads` first and runs the
segment-sum path, which floors decays instead, for the heads that do not fit only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ssd_core import factored_core

#: switch for tests and comparisons: False always takes the segment-sum path
FACTORED = {"enabled": True}


def floor_exponent(dtype: torch.dtype) -> float:
    """log(sqrt(tiny)) of ``dtype`` (-43.7 in float32, -354 in float64)."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def chunk_masks(reset: Tensor | None, batch: int, chunks: int, Q: int, device: torch.device):
    """Masks that cut decays at segment starts, per chunk. reset: (batch, chunks * Q) bool or None.

    Returns (intra, to_end, from_start, through):
        intra (batch, chunks, 1, Q, Q): no reset in (s, t] for s <= t (lower triangle);
        to_end (batch, chunks, Q, 1): no reset in (s, Q-1];
        from_start (batch, chunks, Q, 1): no reset in [0, t]  (the entering state survives to t);
        through (batch, chunks, 1): no reset anywhere in the chunk.
    With reset None the last three are None and intra is the plain causal mask (Q, Q).
    """
    causal = torch.ones(Q, Q, dtype=torch.bool, device=device).tril()
    if reset is None:
        return causal, None, None, None
    seg = reset.reshape(batch, chunks, Q).to(torch.int32).cumsum(-1)  # number of resets at positions <= t
    intra = (seg.unsqueeze(-1) == seg.unsqueeze(-2)) & causal
    to_end = seg == seg[..., -1:]
    from_start = seg == 0
    return intra.unsqueeze(2), to_end.unsqueeze(-1), from_start.unsqueeze(-1), from_start[..., -1:]


def strict_lower(Q: int, device: torch.device) -> Tensor:
    """(Q, Q) bool, True below the diagonal."""
    return torch.ones(Q, Q, dtype=torch.bool, device=device).tril(-1)


def _chunk_log_decays(dt: Tensor, A: Tensor, Q: int) -> Tensor:
    """Running sums of the log decays within each chunk, float64: dt (b, L, H), A (H,) -> (b, chunks, Q, H)
    (the length padded with dt = 0 to whole chunks)."""
    batch, length, heads = dt.shape
    chunks = -(-length // Q)
    pad = chunks * Q - length
    dtc = (F.pad(dt, (0, 0, 0, pad)) if pad else dt).reshape(batch, chunks, Q, heads)
    return (dtc * A).double().cumsum(2)


def _fits(acs: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, chunks, H) bool: the chunk's range of acs (0 included) fits normal factors; False for NaN."""
    top, bottom = acs.amax(2).clamp_(min=0), acs.amin(2).clamp_(max=0)
    return (top - bottom) <= -2 * floor_exponent(dtype)


def factored_heads(dt: Tensor, A: Tensor, Q: int) -> Tensor:
    """(H,) bool: the heads whose every chunk (every sequence) the factored path carries in ``dt``'s dtype."""
    with torch.no_grad():
        return _fits(_chunk_log_decays(dt, A, Q), dt.dtype).flatten(0, 1).all(0)


def ssd_factored(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
    reset: Tensor | None, Q: int
) -> tuple[Tensor, Tensor] | None:
    """Left-to-right SSD by factored decays (see the module docstring), or None when some chunk's decay range is
    too wide for normal factors or Q is 1. x: (b, L, H, P); dt: (b, L, H); A, D: (H,); B, C: (b, L, G, N);
    h0: (b, H, P, N) or None; reset: (b, L) bool or None; CPU float32/float64. Returns y (b, L, H, P) and the
    final state (b, H, P, N)."""
    batch, length, heads, P = x.shape
    if Q == 1:  # no within-chunk product to factor
        return None
    G, N = B.shape[2], B.shape[3]
    R = heads // G
    chunks = -(-length // Q)
    cdt = x.dtype
    pad = chunks * Q - length
    dtc = (F.pad(dt, (0, 0, 0, pad)) if pad else dt).reshape(batch, chunks, Q, heads)
    acs = (dtc * A).double().cumsum(2)  # (b, c, Q, H)
    with torch.no_grad():  # the centre: y does not depend on it, so no gradient flows through it
        if not bool(_fits(acs, cdt).all()):  # also NaN: segment sums keep other rows
            return None
        m = (acs.amax(2).clamp_(min=0) + acs.amin(2).clamp_(max=0)).mul_(0.5)  # (b, c, H)
    if pad:  # dt = 0 pads: decay 1 and input 0, so outputs and the final state are unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    intra, to_end, from_start, through = chunk_masks(reset, batch, chunks, Q, x.device)
    end = acs[:, :, -1]  # (b, c, H)
    e = (acs - m.unsqueeze(2)).exp().to(cdt)  # (b, c, Q, H)
    fw = (m.unsqueeze(2) - acs).exp().to(cdt) * dtc
    rin, rout = (end - m).exp().to(cdt), m.exp().to(cdt)
    tot = end.clamp(min=floor_exponent(cdt)).exp().to(cdt)
    if through is not None:
        tot = tot * through
    bcg = batch * chunks * G
    Bg = B.reshape(batch, chunks, Q, G, N).transpose(2, 3)  # (b, c, G, Q, N), a view for G = 1
    Cg = C.reshape(batch, chunks, Q, G, N).transpose(2, 3)
    # masked C_t . B_s for s < t (b, c, G, Q, Q); the diagonal, whose decay is exactly 1, joins the D skip
    # (through the factors its gradient w.r.t. the decays would be two large terms cancelling to rounding noise)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2)) * (intra & strict_lower(Q, x.device))
    skip = dtc * (Cg * Bg).sum(-1).transpose(2, 3).repeat_interleave(R, -1)  # (b, c, Q, H): C_t . B_t dt_t
    if D is not None:
        skip = skip + D
    Bs = Bg if to_end is None else Bg * to_end.unsqueeze(2)
    Cs = Cg if from_start is None else Cg * from_start.unsqueeze(2)
    h = None if h0 is None else h0.view(batch, G, R, P, N).permute(0, 1, 4, 2, 3)  # (b, G, N, R, P)
    grid = (batch * chunks, Q, G, R)
    y, hT = factored_core(x.reshape(*grid, P), fw.reshape(grid), e.reshape(grid), skip.reshape(grid),
                          CB.reshape(bcg, Q, Q), Bs.reshape(bcg, Q, N), Cs.reshape(bcg, Q, N),
                          tot.view(batch, chunks, G, R), rin.view(batch, chunks, G, R),
                          rout.view(batch, chunks, G, R), h)
    y = y.reshape(batch, chunks * Q, heads, P)[:, :length]
    return y, hT.permute(0, 1, 3, 4, 2).reshape(batch, heads, P, N)

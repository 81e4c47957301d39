"""SSD's segment-sum path: the chunked algorithm with a (Q, Q) decay matrix per head and chunk, exponents floored.

:func:`ops.ssd <ssmkit.ops.ssd.ssd>` runs it for the heads whose chunk decay ranges the factored path
(:mod:`._ssd_factored`) cannot carry in normal floats, for chunk size 1 and where the fused kernels do not run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ssd_factored import chunk_masks
from ._ssd_state import state_pass
from .linear_scan import use_fused


def _log_decay_sums(a: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Running sums of the log decays a (b, c, Q, H) along each chunk, in float64 (a small tensor).

    Returns (hi, lo, acs): acs the float64 sums; hi + lo their double-float split in a's dtype (lo None for
    float64 a). Segment sums are then formed as (hi_t - hi_s) + (lo_t - lo_s): the subtraction of two floats is
    correctly rounded, so the exponent keeps the precision of the segment itself rather than losing
    eps * |running sum| (~1e-5 in float32 at chunk 256 with dt ~ 1), and the lo part, tiny, factors out of the
    exponent as exp(lo_t) exp(-lo_s).
    """
    acs = a.double().cumsum(2)
    if a.dtype == torch.float64:
        return acs, None, acs
    hi = acs.to(a.dtype)
    return hi, (acs - hi.double()).to(a.dtype), acs


def _floor(dtype: torch.dtype) -> float:
    """The floor of every decay exponent, log(sqrt(tiny)) (-43.7 in float32, -354 in float64).

    torch's vectorised exp falls to a slow path (10-100x) on any input that underflows (or is -inf), and GEMMs
    slow down ~10x on subnormal operands: a weight of at least sqrt(tiny) keeps both the weights and their
    products with ordinary values normal. The weights raised, below 1e-19 in float32, are far below what
    the sums they enter can resolve (their rounding error is ~1e-7 of the largest term).
    """
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def _exp(t: Tensor, dtype: torch.dtype) -> Tensor:
    """exp of float64 log decays with the exponent floored for ``dtype`` (see :func:`_floor`), cast to it."""
    return t.clamp(min=_floor(dtype)).exp().to(dtype)


class _Scores(torch.autograd.Function):
    """Intra-chunk scores: out[.., g, r, t, s] = exp(hi_t - hi_s) * CB[.., g, t, s] where ``keep`` (broadcast; CB
    is already zero elsewhere). hi: (b, c, H, Q) running log-decay sums; CB: (b, c, G, Q, Q) masked C_t . B_s;
    returns (b, c, G, H / G, Q, Q).

    Exponents are floored (see :func:`_floor`). With every log decay <= 0 (``nonpositive``) the masked (upper)
    part is positive, so one clamp at 0 masks it; otherwise it is zeroed first. Backward takes
    d exp(seg) = exp(seg) at the floored weights too (it differs from the clamp's gradient by less than
    sqrt(tiny) * |grad|), in a few passes instead of autograd's dozen (no double backward).
    """

    @staticmethod
    def forward(ctx, hi: Tensor, CB: Tensor, keep: Tensor, nonpositive: bool):
        batch, chunks, heads, Q = hi.shape
        G = CB.shape[2]
        seg = hi.unsqueeze(-1) - hi.unsqueeze(-2)  # (b, c, H, Q_t, Q_s)
        if not nonpositive:
            seg.masked_fill_(~keep, 0)
        decay = seg.clamp_(_floor(seg.dtype), 0 if nonpositive else None).exp_()
        decay = decay.view(batch, chunks, G, heads // G, Q, Q)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(decay, CB)
            return decay * CB.unsqueeze(3)
        return decay.mul_(CB.unsqueeze(3))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        decay, CB = ctx.saved_tensors
        gs = g * decay
        gCB = gs.sum(3) if ctx.needs_input_grad[1] else None
        gseg = gs.mul_(CB.unsqueeze(3)).flatten(2, 3)  # (b, c, H, Q_t, Q_s)
        return gseg.sum(-1) - gseg.sum(-2), gCB, None, None


def _state_loop(S: Tensor, total: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
    """The chunk-state recurrence by autograd, for devices without the fused kernel: S (b, c, G, N, R, P),
    total (b, c, G, 1, R, 1), h (b, G, N, R, P) or None; returns the entering states and the final state."""
    if h is None:
        h = S.new_zeros(S.shape[:1] + S.shape[2:])
    starts = []
    # unbind once: indexing S[:, c] in the loop would make autograd add a zero-filled full-size gradient per chunk
    for S_c, total_c in zip(S.unbind(1), total.unbind(1), strict=True):
        starts.append(h)
        h = torch.addcmul(S_c, total_c, h)
    return torch.stack(starts, 1), h


def _ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
    reset: Tensor | None, Q: int
) -> tuple[Tensor, Tensor]:
    """Left-to-right SSD. x: (b, L, H, P); dt: (b, L, H); A, D: (H,); B, C: (b, L, G, N);
    h0: (b, H, P, N) or None; reset: (b, L) bool or None. Returns y (b, L, H, P) and the final state.

    Every tensor of size L * H * P or larger is built once, in the layout its GEMM reads (an elementwise result
    takes the layout of its first operand), so no GEMM copies one; the GEMMs run over all chunks at once. The
    chunk states and the entering states, (b, c, G, N, R*P) each, are built whole: like the scores (b, c, H,
    Q, Q), their size is linear in the length. States are kept transposed, (N, heads * P) per group, so that
    the state GEMMs read x, B and C in their natural layout. Exponents are floored (:func:`_floor`).
    """
    batch, length, heads, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = heads // G
    chunks = -(-length // Q)
    pad = chunks * Q - length
    if pad:  # dt = 0 pads: decay 1 and input 0, so outputs and the final state are unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    intra, to_end, from_start, through = chunk_masks(reset, batch, chunks, Q, x.device)
    bc, cdt = batch * chunks, x.dtype

    dtc = dt.reshape(batch, chunks, Q, heads)
    a = dtc * A  # log decay of each step: (b, c, Q, H)
    hi, lo, acs = _log_decay_sums(a)
    xc = x.reshape(batch, chunks, Q, heads, P)
    Bc = B.reshape(batch, chunks, Q, G, N).transpose(2, 3)  # (b, c, G, Q, N)
    Cc = C.reshape(batch, chunks, Q, G, N).transpose(2, 3)

    # 1. intra-chunk: y_t = sum_{s<=t} (C_t . B_s) exp(seg_ts) dt_s x_s with seg_ts = sum_{s<r<=t} a_r,
    # exp(seg_ts) = exp(hi_t - hi_s) exp(lo_t) exp(-lo_s); exp(-lo_s) goes into the inputs, exp(lo_t) into y.
    hiT = hi.transpose(2, 3).contiguous()  # (b, c, H, Q)
    CB = torch.matmul(Cc, Bc.transpose(-1, -2)) * intra  # (b, c, G, Q_t, Q_s), masked
    scores = _Scores.apply(hiT, CB, intra, bool((a <= 0).all()))  # (b, c, G, R, Q_t, Q_s)
    w_in = dtc if lo is None else dtc * torch.exp(-lo)
    w_in = w_in.transpose(2, 3).contiguous().unsqueeze(-1)  # (b, c, H, Q, 1)
    xs = w_in * xc.transpose(2, 3)  # (b, c, H, Q, P), contiguous (the first operand's layout)
    y_intra = torch.bmm(scores.view(bc * heads, Q, Q), xs.reshape(bc * heads, Q, P))

    # 2. chunk end-states from the chunk's own inputs, S_c = sum_s B_s^T exp(acs_end - acs_s) dt_s x_s;
    # 3. a short sequential recurrence across chunks; 4. the entering state's contribution C_t . h_start
    w_end = _exp(acs[:, :, -1:] - acs, cdt) * dtc  # (b, c, Q, H)
    if to_end is not None:
        w_end = w_end * to_end
    w_end = w_end.view(batch, chunks, Q, G, R).transpose(2, 3).contiguous().unsqueeze(-1)  # (b, c, G, Q, R, 1)
    xw = w_end * xc.view(batch, chunks, Q, G, R, P).transpose(2, 3)  # (b, c, G, Q, R, P), contiguous
    S = torch.matmul(Bc.transpose(-1, -2), xw.reshape(batch, chunks, G, Q, R * P))  # (b, c, G, N, R*P)
    total = _exp(acs[:, :, -1], cdt)  # (b, c, H)
    if through is not None:
        total = total * through
    h = None if h0 is None else h0.view(batch, G, R, P, N).permute(0, 1, 4, 2, 3).contiguous()  # (b, G, N, R, P)
    if use_fused(x):  # one fused sweep over the chunks, forward and backward (no per-chunk tensors)
        entering, h = state_pass(S.view(batch, chunks, G, N, R, P), total.view(batch, chunks, G, R), h)
    else:
        entering, h = _state_loop(S.view(batch, chunks, G, N, R, P), total.view(batch, chunks, G, 1, R, 1), h)
    entering = entering.view(batch, chunks, G, N, R * P)
    yo = torch.matmul(Cc, entering).view(batch, chunks, G, Q, R, P).transpose(2, 3)  # (b, c, Q, G, R, P)

    w_start = _exp(acs, cdt)
    if from_start is not None:
        w_start = w_start * from_start
    y = w_start.view(batch, chunks, Q, G, R, 1) * yo  # (b, c, Q, G, R, P), contiguous
    y = y.reshape(batch, chunks, Q, heads, P)
    y_intra = y_intra.view(batch, chunks, heads, Q, P).transpose(2, 3)
    y = y.add_(y_intra) if lo is None else y.addcmul_(y_intra, torch.exp(lo).unsqueeze(-1))
    if D is not None:
        y = y.addcmul_(xc, D.unsqueeze(-1))
    y = y.reshape(batch, chunks * Q, heads, P)[:, :length]
    return y, h.permute(0, 1, 3, 4, 2).reshape(batch, heads, P, N)

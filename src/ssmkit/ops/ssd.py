"""Mamba-2's state space duality (SSD): the chunked algorithm in pure PyTorch, GEMM-bound."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_flag, check_params, check_reset, check_same, check_shape, check_tensor, reverse_reset
from ._ssd_factored import FACTORED, chunk_masks, factored_heads, ssd_factored
from ._ssd_state import state_pass
from .linear_scan import check_state, compute_dtype, use_fused


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return chunk_size


def _check_bc(name: str, M: object, batch: int, length: int, heads: int) -> Tensor:
    M = check_tensor(name, M, ndim=4, what="(batch, length, groups, N)")
    groups = M.shape[2]
    if groups < 1 or heads % groups:
        raise ValueError(
            f"{name} has {groups} groups (shape {tuple(M.shape)}), but groups must divide heads={heads}"
        )
    check_shape(name, M, (batch, length, groups, M.shape[3]), "(batch, length, groups, N)")
    return M


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


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Mamba-2's SSD by the chunked algorithm.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t
    (per head; B and C are shared by the heads of a group). Chunks of ``chunk_size``: a masked quadratic
    (attention-like) term inside each chunk, and a short sequential recurrence over the chunk end-states.

    Args:
        x: (batch, length, heads, head_dim).
        dt: (batch, length, heads), already positive (softplus applied by the caller).
        A: (heads,), a scalar decay rate per head (negative for a stable recurrence).
        B, C: (batch, length, groups, N) with groups dividing heads; head h reads group h // (heads / groups).
        D: (heads,) skip.
        x, dt, B and C (the activations) share one dtype; A and D (the parameters) have that dtype or, with
        float16/bfloat16 activations, float32 (as in mamba_ssm): the scan runs in float32, y comes back in
        x's dtype and the parameters' gradients in float32. Any other mix is a TypeError.
        Inside ``torch.autocast`` the GEMMs still run in the compute dtype (autocast is switched off here).
        chunk_size: chunk length Q; length need not be a multiple of it.
        initial_state: (batch, heads, head_dim, N).
        reset: bool (batch, length); True at t zeroes the state before step t (segment start).
        reverse: run right to left; ``initial_state`` enters at the last position.

    Returns:
        y (batch, length, heads, head_dim) in x's dtype, or ``(y, final_state)`` with final_state
        (batch, heads, head_dim, N) in the compute dtype (float32 for 16-bit inputs).
    """
    check_tensor("x", x, ndim=4, what="(batch, length, heads, head_dim)")
    batch, length, heads, head_dim = x.shape
    if length == 0:
        raise ValueError(f"x must have length >= 1, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"ssd takes real tensors, got x with dtype {x.dtype}")
    check_tensor("dt", dt, ndim=3, what="(batch, length, heads)")
    check_shape("dt", dt, (batch, length, heads), "(batch, length, heads)")
    check_tensor("A", A, ndim=1, what="(heads,)")
    check_shape("A", A, (heads,), "(heads,)")
    _check_bc("B", B, batch, length, heads)
    _check_bc("C", C, batch, length, heads)
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got B {tuple(B.shape)} and C {tuple(C.shape)}")
    if D is not None:
        check_tensor("D", D, ndim=1, what="(heads,)")
        check_shape("D", D, (heads,), "(heads,)")
    check_same("x", x, dt=dt, B=B, C=C)
    check_params("x", x, A=A, D=D)
    Q = _check_chunk_size(chunk_size)
    reverse = check_flag("reverse", reverse)
    check_flag("return_final_state", return_final_state)
    N = B.shape[3]
    check_state("initial_state", initial_state, (batch, heads, head_dim, N), x)
    reset = check_reset(reset, batch, length, x.device)

    with torch.autocast(x.device.type, enabled=False):  # SSD's GEMMs accumulate in the compute dtype
        return _ssd(x, dt, A, B, C, D, Q, initial_state, reset, reverse, return_final_state)


#: positions per piece (rounded down to whole chunks, at least one): a long sequence runs as pieces in order, each
#: continuing the state of the one before, so every temporary of the chunked algorithm (scores, chunk states: sizes
#: linear in the length) stays a few MiB. Whole-sequence temporaries of 64-128 MiB at 32,768 positions were mapped
#: fresh by the C heap on every allocation (page faults on every page) and streamed through memory.
PIECE = 4096


def _ssd_piece(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
               reset: Tensor | None, Q: int) -> tuple[Tensor, Tensor]:
    """One piece: the factored-decay path (:mod:`._ssd_factored`, no per-head (Q, Q) matrices) for the heads whose
    factors stay normal when the fused kernels run, the segment-sum path :func:`_ssd_chunked` for the others."""
    if FACTORED["enabled"] and use_fused(x) and Q > 1:
        ok = factored_heads(dt, A, Q)
        if bool(ok.all()):
            out = ssd_factored(x, dt, A, B, C, D, h0, reset, Q)
            if out is not None:
                return out
        elif bool(ok.any()):
            return _split_heads(ok, x, dt, A, B, C, D, h0, reset, Q)
    return _ssd_chunked(x, dt, A, B, C, D, h0, reset, Q)


def _split_heads(ok: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 h0: Tensor | None, reset: Tensor | None, Q: int) -> tuple[Tensor, Tensor]:
    """The heads where ``ok`` (H,) bool by the factored path, the others by segment sums; heads are independent
    given B and C, so this is each path's own result per head. A head takes its group's B and C (whole groups
    when ``ok`` splits none, else one group per head)."""
    heads, G = x.shape[2], B.shape[2]
    R = heads // G
    whole = bool((ok.view(G, R) == ok.view(G, R)[:, :1]).all())
    outs, order = [], []
    for part, run in ((ok, ssd_factored), (~ok, _ssd_chunked)):
        idx = part.nonzero().flatten()
        grp = idx[::R] // R if whole else idx // R
        Bi, Ci = (M if G == 1 else M.index_select(2, grp) for M in (B, C))
        out = run(x.index_select(2, idx), dt.index_select(2, idx), A[idx], Bi, Ci, None if D is None else D[idx],
                  None if h0 is None else h0.index_select(1, idx), reset, Q)
        if out is None:  # not expected: the same check passed per head
            return _ssd_chunked(x, dt, A, B, C, D, h0, reset, Q)
        outs.append(out)
        order.append(idx)
    back = torch.cat(order).argsort()
    return (torch.cat([outs[0][0], outs[1][0]], 2).index_select(2, back),
            torch.cat([outs[0][1], outs[1][1]], 1).index_select(1, back))


def _ssd_pieces(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
                reset: Tensor | None, Q: int) -> tuple[Tensor, Tensor]:
    """:func:`_ssd_piece` over pieces of :data:`PIECE` positions (whole chunks), the state carried across."""
    length = x.shape[1]
    piece = Q * max(1, PIECE // Q)
    if length <= piece:
        return _ssd_piece(x, dt, A, B, C, D, h0, reset, Q)
    ys, h = [], h0
    # split, not slices: one backward node that concatenates the pieces' gradients (a slice's backward would add a
    # zero-filled whole-length gradient per piece)
    parts = [t.split(piece, dim=1) for t in (x, dt, B, C)]
    resets = [None] * len(parts[0]) if reset is None else reset.split(piece, dim=1)
    for xp, dtp, Bp, Cp, rp in zip(*parts, resets, strict=True):
        y, h = _ssd_piece(xp, dtp, A, Bp, Cp, D, h, rp, Q)
        ys.append(y)
    return torch.cat(ys, 1), h


def _ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, Q: int,
         initial_state: Tensor | None, reset: Tensor | None, reverse: bool, return_final_state: bool):
    """:func:`ssd` on checked arguments."""
    length = x.shape[1]
    cdt = compute_dtype(x.dtype)
    xf, dtf, Af, Bf, Cf = (t.to(cdt) for t in (x, dt, A, B, C))
    h0 = None if initial_state is None else initial_state.to(cdt)
    Dc = None if D is None else D.to(cdt)
    Q = min(Q, length)
    if reverse:
        r = None if reset is None else reverse_reset(reset).flip(1)
        y, hT = _ssd_pieces(xf.flip(1), dtf.flip(1), Af, Bf.flip(1), Cf.flip(1), Dc, h0, r, Q)
        y = y.flip(1)
    else:
        y, hT = _ssd_pieces(xf, dtf, Af, Bf, Cf, Dc, h0, reset, Q)
    y = y.to(x.dtype)
    return (y, hT) if return_final_state else y

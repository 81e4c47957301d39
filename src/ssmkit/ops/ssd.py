"""Mamba-2's state space duality (SSD): the chunked algorithm in pure PyTorch, GEMM-bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_flag, check_params, check_reset, check_same, check_shape, check_tensor, reverse_reset
from .linear_scan import check_state, compute_dtype


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


def _chunk_masks(reset: Tensor | None, batch: int, chunks: int, Q: int, device: torch.device):
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


def _segsum_t(a: Tensor) -> Tensor:
    """Segment sums of log decays, transposed: a (..., Q) -> (..., Q, Q) with out[s, t] = sum_{s<r<=t} a_r for
    t > s and 0 for t <= s (exp gives 1 there; callers mask those entries).

    Each segment is summed directly, by a cumulative sum along an upper-triangular copy of ``a``, rather than
    as the difference of two running sums: in float32, cumsum_t - cumsum_s loses everything below
    eps * |cumsum|, which at chunk 256 with dt ~ 1 is ~1e-5 in every exponent, even for neighbouring t and s.
    """
    Q = a.shape[-1]
    later = torch.ones(Q, Q, dtype=torch.bool, device=a.device).triu(1)  # t > s
    return a.unsqueeze(-2).expand(*a.shape[:-1], Q, Q).masked_fill(~later, 0).cumsum(-1)


class _StatePass(torch.autograd.Function):
    """Parts 2-4 of SSD (end-states, recurrence across chunks, state outputs), fused one chunk at a time.

    Per batch and group, with states transposed to (N, R*P):
        yo_c = C_c h_c;   h_{c+1} = a_c * h_c + B_c^T xw_c;   h_0 = h0.
    xw: (b, c, G, Q, R*P); B, C: (b, c, G, Q, N); a: (b, c, G, 1, R*P); h0: (b, G, N, R*P).
    Returns yo (b, c, G, Q, R*P) and the final state (b, G, N, R*P). The only state-sized tensor built is the
    entering states (b, c, G, N, R*P), saved for backward (not at all without grad); the working set stays in
    cache. Backward runs the recurrence right to left (no double backward). Results are assigned, never
    written through ``out=``, which a TorchFunctionMode that casts arguments (e.g. a bfloat16-matmul mode)
    would silently redirect into a temporary copy.
    """

    @staticmethod
    def forward(ctx, xw: Tensor, B: Tensor, C: Tensor, a: Tensor, h0: Tensor):
        chunks = xw.shape[1]
        save = any(ctx.needs_input_grad)
        yo = xw.new_empty(chunks, *xw.shape[:1], *xw.shape[2:])  # chunk-major: every yo[c] is contiguous
        starts = h0.new_empty(chunks, *h0.shape) if save else None
        Bt = B.transpose(-1, -2)
        h = h0.contiguous()
        for c in range(chunks):
            if starts is not None:
                starts[c] = h
            yo[c] = torch.matmul(C[:, c], h)
            h = torch.matmul(Bt[:, c], xw[:, c]).addcmul_(a[:, c], h)
        ctx.save_for_backward(xw, B, C, a, starts)
        return yo.transpose(0, 1), h

    @staticmethod
    def backward(ctx, gyo: Tensor | None, ghT: Tensor | None):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):  # GEMMs in the compute dtype
            return _StatePass._backward(ctx, gyo, ghT)

    @staticmethod
    def _backward(ctx, gyo: Tensor | None, ghT: Tensor | None):
        xw, B, C, a, starts = ctx.saved_tensors
        chunks = xw.shape[1]
        gh = torch.zeros_like(starts[0]) if ghT is None else ghT.contiguous()
        major = (lambda t: (t.shape[1], t.shape[0], *t.shape[2:]))  # noqa: E731  chunk-major shapes
        gxw, gB, ga = xw.new_empty(major(xw)), B.new_empty(major(B)), a.new_empty(major(a))
        gC = C.new_zeros(major(C))
        for c in range(chunks - 1, -1, -1):
            # gh is dL/dh_{c+1}; h_{c+1} = a_c h_c + B_c^T xw_c
            gxw[c] = torch.matmul(B[:, c], gh)
            gB[c] = torch.matmul(xw[:, c], gh.transpose(-1, -2))
            ga[c] = (gh * starts[c]).sum(-2, keepdim=True)
            gh = gh * a[:, c]
            if gyo is not None:  # yo_c = C_c h_c
                g = gyo[:, c]
                gC[c] = torch.matmul(g, starts[c].transpose(-1, -2))
                gh = gh.add_(torch.matmul(C[:, c].transpose(-1, -2), g))
        return gxw.transpose(0, 1), gB.transpose(0, 1), gC.transpose(0, 1), ga.transpose(0, 1), gh


def _ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, reset: Tensor | None, Q: int
) -> tuple[Tensor, Tensor]:
    """Left-to-right SSD without D. x: (b, L, H, P); dt: (b, L, H); A: (H,); B, C: (b, L, G, N);
    h0: (b, H, P, N) or None; reset: (b, L) bool or None. Returns y (b, L, H, P) and the final state.

    Internally states are kept transposed, (N, heads * P) per group, so that every GEMM reads x, B and C in
    their natural (position-major) layout.
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
    intra, to_end, from_start, through = _chunk_masks(reset, batch, chunks, Q, x.device)

    dtc = dt.reshape(batch, chunks, Q, heads)
    a = dtc * A  # log decay of each step: (b, c, Q, H)
    acs = a.cumsum(2)  # log decay from the chunk start through t
    xdt = x.reshape(batch, chunks, Q, heads, P) * dtc.unsqueeze(-1)  # the input entering the state
    Bc = B.reshape(batch, chunks, Q, G, N).transpose(2, 3)  # (b, c, G, Q, N)
    Cc = C.reshape(batch, chunks, Q, G, N).transpose(2, 3)

    # 1. intra-chunk: y_t = sum_{s<=t} (C_t . B_s) exp(seg_ts) dt_s x_s with seg_ts = sum_{s<r<=t} a_r
    # Built transposed, (s, t), so that the segment sums run along the contiguous last axis.
    keep_t = intra.to(acs.dtype).transpose(-1, -2)
    seg_t = _segsum_t(a.transpose(2, 3))  # (b, c, H, Q_s, Q_t)
    if reset is not None:  # exponent 0 across segment starts too: zeroed below, never overflowing
        seg_t.mul_(keep_t)
    seg_t = seg_t.exp_()
    BC = torch.matmul(Bc, Cc.transpose(-1, -2)) * keep_t  # (b, c, G, Q_s, Q_t)
    scores_t = (seg_t.view(batch, chunks, G, R, Q, Q) * BC.unsqueeze(3)).view(batch, chunks, heads, Q, Q)
    y_intra = torch.matmul(scores_t.transpose(-1, -2), xdt.transpose(2, 3))  # (b, c, H, Q, P)

    # 2. chunk end-states from the chunk's own inputs, S_c = sum_s B_s^T exp(acs_end - acs_s) dt_s x_s;
    # 3. a short sequential recurrence across chunks; 4. the entering state's contribution C_t . h_start
    # the decay after s to the chunk end, summed from the right (not acs_end - acs_s, see _segsum_t)
    w_end = F.pad(a[:, :, 1:], (0, 0, 0, 1)).flip(2).cumsum(2).flip(2).exp()  # (b, c, Q, H)
    if to_end is not None:
        w_end = w_end * to_end
    xw = (xdt * w_end.unsqueeze(-1)).view(batch, chunks, Q, G, R * P).transpose(2, 3)  # (b, c, G, Q, R*P)
    total = acs[:, :, -1].exp()  # (b, c, H)
    if through is not None:
        total = total * through
    total = total.view(batch, chunks, G, 1, R, 1).expand(-1, -1, -1, -1, -1, P)
    total = total.reshape(batch, chunks, G, 1, R * P)
    if h0 is None:
        h0 = x.new_zeros(batch, G, N, R * P)
    else:
        h0 = h0.view(batch, G, R, P, N).permute(0, 1, 4, 2, 3).reshape(batch, G, N, R * P)
    yo, hT = _StatePass.apply(xw, Bc, Cc, total, h0)  # yo: (b, c, G, Q, R*P)

    w_start = acs.exp()
    if from_start is not None:
        w_start = w_start * from_start
    yo = yo.view(batch, chunks, G, Q, R, P).permute(0, 1, 3, 2, 4, 5)  # (b, c, Q, G, R, P)
    y = yo * w_start.view(batch, chunks, Q, G, R, 1)
    y = y.add_(y_intra.view(batch, chunks, G, R, Q, P).permute(0, 1, 4, 2, 3, 5))

    y = y.reshape(batch, chunks * Q, heads, P)[:, :length]
    hT = hT.view(batch, G, N, R, P).permute(0, 1, 3, 4, 2).reshape(batch, heads, P, N)
    return y, hT


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


def _ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, Q: int,
         initial_state: Tensor | None, reset: Tensor | None, reverse: bool, return_final_state: bool):
    """:func:`ssd` on checked arguments."""
    length = x.shape[1]
    cdt = compute_dtype(x.dtype)
    xf, dtf, Af, Bf, Cf = (t.to(cdt) for t in (x, dt, A, B, C))
    h0 = None if initial_state is None else initial_state.to(cdt)
    Q = min(Q, length)
    if reverse:
        r = None if reset is None else reverse_reset(reset).flip(1)
        y, hT = _ssd_chunked(xf.flip(1), dtf.flip(1), Af, Bf.flip(1), Cf.flip(1), h0, r, Q)
        y = y.flip(1)
    else:
        y, hT = _ssd_chunked(xf, dtf, Af, Bf, Cf, h0, reset, Q)
    if D is not None:
        y = torch.addcmul(y, xf, D.to(cdt)[:, None])
    y = y.to(x.dtype)
    return (y, hT) if return_final_state else y

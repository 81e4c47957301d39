"""Mamba-2's state space duality (SSD): the chunked algorithm in pure PyTorch, GEMM-bound."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_flag, check_params, check_reset, check_same, check_shape, check_tensor, reverse_reset
from ._ssd_factored import FACTORED, factored_heads, ssd_factored
from ._ssd_segsum import _ssd_chunked
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

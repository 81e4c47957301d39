"""Mamba's selective scan (S6) with a fused CPU kernel and a chunked pure-PyTorch path for other devices."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _numba_kernels as K
from ._checks import check_flag, check_params, check_reset, check_same, check_shape, check_tensor, reverse_reset
from ._torch_scan import selective_scan_chunked
from .linear_scan import check_state, compute_dtype, use_fused


def _blocks(dim: int, groups: int) -> np.ndarray:
    """Channel blocks (start, width, group) of at most SS_BLOCK channels, never crossing a group boundary."""
    per = dim // groups
    rows = [(g * per + s, min(K.SS_BLOCK, per - s), g) for g in range(groups) for s in range(0, per, K.SS_BLOCK)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


#: stripes per group in the backward: each owns (batch, length, groups, N) partial B/C gradients summed at the end
#: in a fixed order, so the result does not depend on how many threads run the stripes (memory: 4x B and C).
_BWD_STRIPES = 4


def _stripes(blocks: np.ndarray, groups: int, parts: int) -> np.ndarray:
    """Split each group's blocks into at most ``parts`` contiguous stripes: (group, part, first_block, end_block)."""
    rows = []
    for g in range(groups):
        idx = np.flatnonzero(blocks[:, 2] == g)
        for p, chunk in enumerate(np.array_split(idx, min(parts, len(idx)))):
            rows.append((g, p, int(chunk[0]), int(chunk[-1]) + 1))
    return np.asarray(rows, dtype=np.int64)


class _SelectiveScanFn(torch.autograd.Function):
    """Fused S6 core with D skip, silu(z) gate and the step size softplus(dt + dt_bias) (softplus only when asked).
    Saves only inputs and (B, L/T, N, D) state checkpoints."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, keep, h0, dt_bias, reverse: bool, grads: bool, softplus: bool):
        # grads: the caller will differentiate (else no checkpoints are saved)
        det = [None if t is None else t.detach().contiguous() for t in (u, dt, A, B, C, D, z, keep, h0, dt_bias)]
        u_, dt_, A_, B_, C_, D_, z_, keep_, h0_, bias_ = det
        batch, length, dim = u_.shape
        N, groups = A_.shape[1], B_.shape[2]
        At = A_.t().contiguous()
        h0t = (torch.zeros(batch, N, dim, dtype=u_.dtype) if h0_ is None else h0_.transpose(1, 2).contiguous())
        dummy = torch.zeros(1, dtype=u_.dtype)
        blocks = _blocks(dim, groups)
        save = grads and any(ctx.needs_input_grad)
        nck = -(-length // K.SS_CHUNK)
        ck = torch.empty((batch, nck, N, dim) if save else (1, 1, 1, 1), dtype=u_.dtype)
        out = torch.empty_like(u_)
        hT = torch.empty(batch, N, dim, dtype=u_.dtype)
        bias = torch.zeros(dim, dtype=u_.dtype) if bias_ is None else bias_
        ctx.work = u_.numel() * N
        args = (u_.numpy(), dt_.numpy(), At.numpy(), B_.numpy(), C_.numpy(), (dummy if D_ is None else D_).numpy(),
                (dummy.reshape(1, 1, 1) if z_ is None else z_).numpy(), keep_.numpy(), h0t.numpy(), blocks)
        flags = (reverse, D_ is not None, z_ is not None, save, ck.numpy(), out.numpy(), hT.numpy())
        with K.kernel_threads(ctx.work) as threads:
            parts = np.linspace(0, len(blocks), min(threads, len(blocks)) + 1).round().astype(np.int64)
            K.selective_fwd(*args, parts, bias.numpy(), softplus, *flags)
        ctx.reverse, ctx.softplus = reverse, softplus
        ctx.has = (D_ is not None, z_ is not None, h0_ is not None, bias_ is not None)
        ctx.blocks = blocks
        ctx.save_for_backward(u_, dt_, At, B_, C_, dummy if D_ is None else D_,
                              dummy.reshape(1, 1, 1) if z_ is None else z_, keep_, ck, bias)
        return out, hT.transpose(1, 2)

    @staticmethod
    def backward(ctx, gout, ghT):
        u, dt, At, B, C, D, z, keep, ck, bias = ctx.saved_tensors
        has_D, has_z, has_h0, has_bias = ctx.has
        batch, length, dim = u.shape
        N, groups = At.shape[0], B.shape[2]
        gout = torch.zeros_like(u) if gout is None else gout.contiguous()
        ghT_t = torch.zeros(batch, N, dim, dtype=u.dtype) if ghT is None else ghT.transpose(1, 2).contiguous()
        parts = _BWD_STRIPES  # fixed, not the thread count: the B/C gradient sums keep one order on any threads
        stripes = _stripes(ctx.blocks, groups, parts)
        gu, gdt = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if has_z else torch.zeros(1, 1, 1, dtype=u.dtype)
        gA = torch.zeros(batch, N, dim, dtype=u.dtype)
        gD = torch.zeros(batch, dim, dtype=u.dtype)
        gbias = torch.zeros(batch, dim, dtype=u.dtype)
        gB = torch.zeros((parts, *B.shape), dtype=u.dtype)
        gC = torch.zeros((parts, *C.shape), dtype=u.dtype)
        gh0 = torch.empty(batch, N, dim, dtype=u.dtype)
        with K.kernel_threads(ctx.work):
            K.selective_bwd(
                u.numpy(), dt.numpy(), At.numpy(), B.numpy(), C.numpy(), D.numpy(), z.numpy(), keep.numpy(),
                ck.numpy(), ctx.blocks, stripes, bias.numpy(), ctx.softplus, ctx.reverse, has_D, has_z,
                gout.numpy(), ghT_t.numpy(), gu.numpy(), gdt.numpy(), gz.numpy(), gA.numpy(), gD.numpy(),
                gbias.numpy(), gB.numpy(), gC.numpy(), gh0.numpy(),
            )
        return (gu, gdt, gA.sum(0).t(), gB.sum(0), gC.sum(0), gD.sum(0) if has_D else None,
                gz if has_z else None, None, gh0.transpose(1, 2) if has_h0 else None,
                gbias.sum(0) if has_bias else None, None, None, None)


def _check_bc(name: str, M: Tensor, batch: int, length: int, dim: int, N: int) -> None:
    check_tensor(name, M, ndim=(3, 4), what="(batch, length, N) or (batch, length, groups, N)")
    if M.ndim == 3:
        check_shape(name, M, (batch, length, N), "(batch, length, N)")
        return
    groups = M.shape[2]
    if groups < 1 or dim % groups:
        raise ValueError(f"{name} has {groups} groups (shape {tuple(M.shape)}), but groups must divide dim={dim}")
    check_shape(name, M, (batch, length, groups, N), "(batch, length, groups, N)")


_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _check_complex(u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    """Complex A (Mamba's complex variant): float32/64 u with A, B, C in the matching complex dtype."""
    want = _COMPLEX.get(u.dtype)
    if want is None:
        raise TypeError(f"a complex A needs float32 or float64 u (complex64 / complex128 A, B, C), got u {u.dtype}")
    for name, t in (("A", A), ("B", B), ("C", C)):
        if t.dtype != want:
            raise TypeError(f"{name} has dtype {t.dtype} but a complex A with u {u.dtype} needs {name} {want}")
        if t.device != u.device:
            raise ValueError(f"{name} is on device {t.device} but u is on {u.device}; move them together")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Mamba's selective scan.

    dt = softplus(delta + delta_bias) (softplus only if ``delta_softplus``);
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t · h_t + D u_t;  out = y * silu(z) when z is given.

    Args:
        u, delta, z: (batch, length, dim), the activations: one dtype.
        A: (dim, N), real, or complex (Mamba's complex variant, see below).
        B, C: (batch, length, N), or (batch, length, groups, N) with groups dividing dim; channel d reads group
            d // (dim / groups); the activations' dtype.
        D, delta_bias: (dim,).
        A, D and delta_bias (the parameters) have the activations' dtype or, with float16/bfloat16
        activations, float32 (as in mamba_ssm): the scan then runs in float32, ``out`` comes back in u's dtype
        and the parameters' gradients in float32. Any other mix is a TypeError.

    Complex A (as mamba_ssm's complex variant): A, B, C (and initial_state) complex64 with float32 u, delta, z,
    D, delta_bias, or complex128 with float64 ones; h is complex and the N complex modes stand for 2N real
    ones (conjugate pairs), so y_t = 2 Re(C_t · h_t) + D u_t, real, as in mamba_ssm's reference. This runs
    the plain-PyTorch chunked path on every device (the fused numba kernels are real-only), differentiably;
    the final state is complex.
        initial_state: (batch, dim, N).
        reset: bool (batch, length); True at t zeroes the state before step t (segment start).
        reverse: scan right to left.

    Returns:
        out (batch, length, dim) in u's dtype, or ``(out, final_state)`` with final_state (batch, dim, N) in the
        compute dtype (float32 for 16-bit inputs).
    """
    check_tensor("u", u, ndim=3, what="(batch, length, dim)")
    batch, length, dim = u.shape
    if length == 0:
        raise ValueError("u must have length >= 1, got shape " + str(tuple(u.shape)))
    check_tensor("delta", delta, ndim=3, what="(batch, length, dim)")
    check_shape("delta", delta, u.shape, "(same as u)")
    check_tensor("A", A, ndim=2, what="(dim, N)")
    if u.is_complex():
        raise TypeError(f"u must be real (only A, B, C and the state may be complex), got dtype {u.dtype}")
    cplx = A.is_complex()
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim={dim}, got {tuple(A.shape)}")
    N = A.shape[1]
    _check_bc("B", B, batch, length, dim, N)
    _check_bc("C", C, batch, length, dim, N)
    if B.ndim != C.ndim or B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got B {tuple(B.shape)} and C {tuple(C.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            check_tensor(name, v, ndim=1, what="(dim,)")
            check_shape(name, v, (dim,), "(dim,)")
    if z is not None:
        check_tensor("z", z, ndim=3, what="(batch, length, dim)")
        check_shape("z", z, u.shape, "(same as u)")
    if cplx:
        _check_complex(u, A, B, C)
        check_same("u", u, delta=delta, z=z)
    else:
        check_same("u", u, delta=delta, B=B, C=C, z=z)
    check_params("u", u, A=None if cplx else A, D=D, delta_bias=delta_bias)
    check_flag("delta_softplus", delta_softplus)
    reverse = check_flag("reverse", reverse)
    check_flag("return_final_state", return_final_state)
    check_state("initial_state", initial_state, (batch, dim, N), A if cplx else u)
    reset = check_reset(reset, batch, length, u.device)

    cdt = compute_dtype(u.dtype)
    cast = (lambda t: None if t is None else t.to(cdt))  # noqa: E731
    keep_c = (lambda t: t) if cplx else cast  # noqa: E731  complex A, B, C and state stay as they are
    uf, Af, Df, zf, h0 = cast(u), keep_c(A), cast(D), cast(z), keep_c(initial_state)
    dt = cast(delta)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    fused = use_fused(uf) and not cplx  # the numba kernels are real-only
    if not fused:  # the fused kernels apply delta_bias and softplus themselves, forward and backward
        if delta_bias is not None:
            dt = dt + cast(delta_bias)
        if delta_softplus:
            dt = F.softplus(dt)
    B4 = keep_c(B) if B.ndim == 4 else keep_c(B).unsqueeze(2)
    C4 = keep_c(C) if C.ndim == 4 else keep_c(C).unsqueeze(2)
    r = None if reset is None else (reverse_reset(reset) if reverse else reset)
    keep = torch.ones(batch, length, dtype=cdt) if r is None else (~r).to(cdt)

    if fused:
        out, hT = _SelectiveScanFn.apply(uf, dt, Af, B4, C4, Df, zf, keep, h0, cast(delta_bias), reverse, grads,
                                         bool(delta_softplus))
    else:
        flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)  # noqa: E731
        y, hT = selective_scan_chunked(flip(uf), flip(dt), Af, flip(B4), flip(C4),
                                       None if r is None else flip(keep), h0)
        y = flip(y)
        if cplx:  # N complex modes standing for 2N real ones (conjugate pairs), as in mamba_ssm
            y = 2 * y.real
        if Df is not None:
            y = y + uf * Df
        out = y if zf is None else y * F.silu(zf)
    out = out.to(u.dtype)
    return (out, hT) if return_final_state else out

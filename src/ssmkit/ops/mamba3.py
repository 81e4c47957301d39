"""Mamba-3's SSM core (arXiv 2603.15569): trapezoidal discretisation, a complex state realised as a data-dependent
rotation of B and C, B/C biases, and the MIMO form of rank R. A fused numba kernel forward and backward on CPU,
the loop oracle (:mod:`ssmkit.ops.reference_mamba3`) elsewhere, and a one-token step."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _numba_mamba3 as K
from ._checks import check_flag, check_params, check_reset, check_same, check_shape, check_tensor, reverse_reset
from .linear_scan import check_state, compute_dtype, use_fused
from .mamba3_step import STEP_KERNEL_MAX_WORK, check_step, fused_step, step_work
from .reference_mamba3 import mamba3 as _mamba3_loop
from .reference_mamba3 import rotate_pairs
from .threads import kernel_threads


class Mamba3ScanState(NamedTuple):
    """angle (batch, heads, S); ssm (batch, heads, P, N); k: the last step's rotated key, (batch, heads, N) SISO
    or (batch, R, heads, N) MIMO; x: the last step's input, (batch, heads, P) or (batch, R, heads, P)."""

    angle: Tensor
    ssm: Tensor
    k: Tensor
    x: Tensor


class _Mamba3Fn(torch.autograd.Function):
    """The fused kernel on (b, L, R, H, P) inputs; saves the inputs and state checkpoints every M3_CHUNK steps."""

    @staticmethod
    def forward(ctx, x, dt, A, lam, B, C, Bb, Cb, w, D, keep, th0, h0, k0, x0, reverse: bool, grads: bool):
        ins = [t.detach().contiguous() for t in (x, dt, A, lam, B, C, Bb, Cb, w, D, keep, th0, h0, k0, x0)]
        x_, dt_, A_, lam_, B_, C_, Bb_, Cb_, w_, D_, keep_, th0_, h0_, k0_, x0_ = ins
        batch, length = x_.shape[:2]
        save = grads and any(ctx.needs_input_grad)
        nck = -(-length // K.M3_CHUNK) if save else 1
        cks = [t.new_empty(batch, nck, *t.shape[1:]) for t in (th0_, h0_, k0_, x0_)]
        y = torch.empty_like(x_)
        outs = [torch.empty_like(t) for t in (th0_, h0_, k0_, x0_)]
        ctx.work = x_.numel() * h0_.shape[-1] * 3
        with kernel_threads(ctx.work):
            K.mamba3_fwd(*(t.numpy() for t in ins), reverse, save, *(t.numpy() for t in cks), y.numpy(),
                         *(t.numpy() for t in outs))
        ctx.reverse = reverse
        if save:
            ctx.save_for_backward(*ins[:11], *cks)
        return (y, *outs)

    @staticmethod
    def backward(ctx, gy, gth, gh, gk, gx):
        x, dt, A, lam, B, C, Bb, Cb, w, D, keep, ck_th, ck_h, ck_k, ck_x = ctx.saved_tensors
        batch, length, R, H, P = x.shape
        G, N = B.shape[3], B.shape[4]
        S = w.shape[3]

        def given(g, *shape):
            return x.new_zeros(shape) if g is None else g.contiguous()

        grads_in = (given(gy, *x.shape), given(gth, batch, H, S), given(gh, batch, H, P, N),
                    given(gk, batch, R, H, N), given(gx, batch, R, H, P))
        gxs, gdt, gA, glam = torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(lam)
        gBh, gCh = x.new_empty(batch, length, R, H, N), x.new_empty(batch, length, R, H, N)
        gw = torch.empty_like(w)
        gBb, gCb, gD = x.new_empty(batch, H, R, N), x.new_empty(batch, H, R, N), x.new_empty(batch, H)
        g0 = [x.new_empty(batch, H, S), x.new_empty(batch, H, P, N), x.new_empty(batch, R, H, N),
              x.new_empty(batch, R, H, P)]
        outs = (gxs, gdt, gA, glam, gBh, gCh, gw, gBb, gCb, gD, *g0)
        with kernel_threads(ctx.work):
            K.mamba3_bwd(*(t.numpy() for t in (x, dt, A, lam, B, C, Bb, Cb, w, D, keep)), ctx.reverse,
                         *(t.numpy() for t in (ck_th, ck_h, ck_k, ck_x)), *(t.numpy() for t in grads_in),
                         *(t.numpy() for t in outs))
        gB = gBh.view(batch, length, R, G, H // G, N).sum(4)
        gC = gCh.view(batch, length, R, G, H // G, N).sum(4)
        return (gxs, gdt, gA, glam, gB, gC, gBb.sum(0), gCb.sum(0), gw, gD.sum(0), None, *g0, None, None)


def _check_act(name: str, t: object, shape: tuple[int, ...], what: str) -> Tensor:
    t = check_tensor(name, t, ndim=len(shape), what=what)
    check_shape(name, t, shape, what)
    return t


def mamba3(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    trap: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    angles: Tensor | None = None,
    B_bias: Tensor | None = None,
    C_bias: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Mamba3ScanState | tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Mamba-3's recurrence, per head (k~, q~: B and C plus their biases, rotated by the angle state th):

        th_t = th_{t-1} + dt_t angles_t;  alpha_t = exp(dt_t A_t);  lam_t = trap_t
        h_t = alpha_t h_{t-1} + (1 - lam_t) dt_t alpha_t sum_r x_{t-1,r} k~_{t-1,r}^T + lam_t dt_t sum_r x_tr k~_tr^T
        y_tr = h_t q~_tr + D x_tr

    lam = 1 is the exponential-Euler end (Mamba-2's SSD when there is no rotation); lam = 1/2 the trapezoid.
    The rotation turns pairs (2i, 2i+1), i < S, by th_i: a complex state with data-dependent phase.

    Args:
        x: (batch, length, heads, P) SISO, or (batch, length, R, heads, P) MIMO (the R up-projected inputs).
        dt: (batch, length, heads), positive. A: (heads,) or (batch, length, heads), negative rates.
        trap: (batch, length, heads), the trapezoid weight lam in [0, 1] (sigmoid applied by the caller).
        B, C: (batch, length, groups, N) SISO or (batch, length, R, groups, N) MIMO; groups divide heads.
        angles: (batch, length, heads, S) with 2 S <= N, rotation rates (radians per unit dt); None: real state.
        B_bias, C_bias: (heads, N) SISO or (heads, R, N) MIMO. D: (heads,).
        Activations (x, dt, trap, B, C, angles, a 3-D A) share one dtype; parameters (a 1-D A, the biases, D)
        have it too or float32 with 16-bit activations, which accumulate in float32.
        initial_state: a :class:`Mamba3ScanState` (or 4-tuple) of the shapes documented there.
        reset: bool (batch, length); True at t zeroes the whole state before step t. reverse: right to left.

    Returns:
        y (x's shape and dtype), or ``(y, Mamba3ScanState)`` in the compute dtype.
    """
    check_tensor("x", x, ndim=(4, 5), what="(batch, length, heads, P) or (batch, length, R, heads, P)")
    siso = x.ndim == 4
    batch, length = x.shape[:2]
    R = 1 if siso else x.shape[2]
    H, P = x.shape[-2], x.shape[-1]
    if length == 0 or R == 0 or H == 0:
        raise ValueError(f"x must have length, R and heads >= 1, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"mamba3 takes real tensors, got x with dtype {x.dtype}")
    bl = (batch, length, H)
    _check_act("dt", dt, bl, "(batch, length, heads)")
    _check_act("trap", trap, bl, "(batch, length, heads)")
    check_tensor("A", A, ndim=(1, 3), what="(heads,) or (batch, length, heads)")
    check_shape("A", A, (H,) if A.ndim == 1 else bl, "(heads,) or (batch, length, heads)")
    bc_what = "(batch, length, groups, N)" if siso else f"(batch, length, R={R}, groups, N)"
    check_tensor("B", B, ndim=x.ndim, what=bc_what)
    G, N = B.shape[-2], B.shape[-1]
    if G < 1 or H % G:
        raise ValueError(f"B has {G} groups (shape {tuple(B.shape)}), but groups must divide heads={H}")
    check_shape("B", B, (batch, length, G, N) if siso else (batch, length, R, G, N), bc_what)
    _check_act("C", C, tuple(B.shape), "(same as B)")
    S = 0
    if angles is not None:
        check_tensor("angles", angles, ndim=4, what="(batch, length, heads, S)")
        S = angles.shape[3]
        if 2 * S > N:
            raise ValueError(f"angles has S={S} rotation angles but 2 * S must be <= N={N}")
        check_shape("angles", angles, (*bl, S), "(batch, length, heads, S)")
    bias_shape = (H, N) if siso else (H, R, N)
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        if t is not None:
            check_tensor(name, t, ndim=len(bias_shape), what=str(bias_shape))
            check_shape(name, t, bias_shape)
    if D is not None:
        _check_act("D", D, (H,), "(heads,)")
    check_same("x", x, dt=dt, trap=trap, B=B, C=C, angles=angles, A=A if A.ndim == 3 else None)
    check_params("x", x, A=A if A.ndim == 1 else None, B_bias=B_bias, C_bias=C_bias, D=D)
    reverse = check_flag("reverse", reverse)
    check_flag("return_final_state", return_final_state)
    reset = check_reset(reset, batch, length, x.device)
    kx = (batch, H) if siso else (batch, R, H)
    shapes = ((batch, H, S), (batch, H, P, N), (*kx, N), (*kx, P))
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 4:
            raise TypeError("initial_state must be a Mamba3ScanState (angle, ssm, k, x), got "
                            f"{type(initial_state).__name__}")
        for name, t, shp in zip(Mamba3ScanState._fields, initial_state, shapes, strict=True):
            check_state(f"initial_state.{name}", t, shp, x)

    cdt = compute_dtype(x.dtype)
    if not use_fused(x):
        y, st = _mamba3_loop(x, dt, A, trap, B, C, angles=angles, B_bias=B_bias, C_bias=C_bias, D=D,
                             initial_state=initial_state, reset=reset, reverse=reverse, return_final_state=True)
        return (y, Mamba3ScanState(*st)) if return_final_state else y
    f = (lambda t: t.to(cdt))  # noqa: E731
    x5 = f(x.unsqueeze(2) if siso else x)
    B5, C5 = f(B.unsqueeze(2) if siso else B), f(C.unsqueeze(2) if siso else C)
    A3 = f(A.expand(bl) if A.ndim == 1 else A)
    zero = x5.new_zeros(())
    Bb = zero.expand(H, R, N) if B_bias is None else f(B_bias.unsqueeze(1) if siso else B_bias)
    Cb = zero.expand(H, R, N) if C_bias is None else f(C_bias.unsqueeze(1) if siso else C_bias)
    w = zero.expand(*bl, 0) if angles is None else f(angles)
    Dv = zero.expand(H) if D is None else f(D)
    r = reverse_reset(reset) if reverse else reset
    keep = x5.new_ones(batch, length) if r is None else (~r).to(cdt)
    if initial_state is None:
        st0 = [x5.new_zeros(s) for s in shapes]
    else:
        st0 = [f(t) for t in initial_state]
    if siso:
        st0[2], st0[3] = st0[2].unsqueeze(1), st0[3].unsqueeze(1)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, trap, B, C, angles, B_bias, C_bias, D, *st0))
    y, th, h, k, xs = _Mamba3Fn.apply(x5, f(dt), A3, f(trap), B5, C5, Bb, Cb, w, Dv, keep, *st0, reverse, grads)
    if siso:
        y, k, xs = y.squeeze(2), k.squeeze(1), xs.squeeze(1)
    y = y.to(x.dtype)
    return (y, Mamba3ScanState(th, h, k, xs)) if return_final_state else y


def mamba3_step(x: Tensor, dt: Tensor, A: Tensor, trap: Tensor, B: Tensor, C: Tensor, state: Mamba3ScanState, *,
                angles: Tensor | None = None, B_bias: Tensor | None = None, C_bias: Tensor | None = None,
                D: Tensor | None = None) -> tuple[Tensor, Mamba3ScanState]:
    """One token of :func:`mamba3`, O(1): the same arguments without the length axis (x (batch, heads, P) or
    (batch, R, heads, P); dt, trap (batch, heads); A (heads,) or (batch, heads); B, C (batch, groups, N) or
    (batch, R, groups, N); angles (batch, heads, S)). Returns (y in x's dtype, new state in the state's dtype).
    On CPU with a float32/float64 state, nothing needing a gradient and a small state (below
    ``STEP_KERNEL_MAX_WORK``), one numba launch (:mod:`ssmkit.ops.mamba3_step`), equal bit for bit to the fused
    forward on that token; else torch ops, whose GEMMs are faster on larger states."""
    if not isinstance(state, Mamba3ScanState):
        raise TypeError(f"state must be a Mamba3ScanState, got {type(state).__name__}")
    siso = check_step(x, dt, A, trap, B, C, state, angles, B_bias, C_bias, D)
    acc = state.ssm.dtype
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, trap, B, C, angles, B_bias, C_bias, D, *state))
    small = step_work(x, state) < STEP_KERNEL_MAX_WORK
    if use_fused(x) and not grads and acc in (torch.float32, torch.float64) and small:
        y, st = fused_step(x, dt, A, trap, B, C, state, angles, B_bias, C_bias, D, siso)
        return y, Mamba3ScanState(*st)
    xs = (x.unsqueeze(1) if siso else x).to(acc)  # (b, R, H, P)
    kp, xp = (state.k.unsqueeze(1), state.x.unsqueeze(1)) if siso else (state.k, state.x)
    rep = state.ssm.shape[1] // B.shape[-2]
    Bh = (B.unsqueeze(1) if siso else B).to(acc).repeat_interleave(rep, dim=2)  # (b, R, H, N)
    Ch = (C.unsqueeze(1) if siso else C).to(acc).repeat_interleave(rep, dim=2)
    if B_bias is not None:
        Bh = Bh + (B_bias.unsqueeze(0) if siso else B_bias.transpose(0, 1)).to(acc)
    if C_bias is not None:
        Ch = Ch + (C_bias.unsqueeze(0) if siso else C_bias.transpose(0, 1)).to(acc)
    d, lam = dt.to(acc), trap.to(acc)
    th = state.angle
    if angles is not None:
        th = th + d[..., None] * angles.to(acc)
        th = th - 2 * math.pi * torch.floor(th / (2 * math.pi))
    cos, sin = th.cos().unsqueeze(1), th.sin().unsqueeze(1)
    k, q = rotate_pairs(Bh, cos, sin), rotate_pairs(Ch, cos, sin)
    alpha = torch.exp(d * A.to(acc))
    beta, gamma = (1 - lam) * d * alpha, lam * d
    # both outer-product terms in one product over (previous, current) x rank
    xw = torch.cat((xp * beta[:, None, :, None], xs * gamma[:, None, :, None]), 1)  # (b, 2R, H, P)
    h = torch.einsum("brhp,brhn->bhpn", xw, torch.cat((kp, k), 1)).addcmul_(alpha[..., None, None], state.ssm)
    y = torch.einsum("bhpn,brhn->brhp", h, q)
    if D is not None:
        y = y + D.to(acc)[:, None] * xs
    if siso:
        y, k, xs = y.squeeze(1), k.squeeze(1), xs.squeeze(1)
    return y.to(x.dtype), Mamba3ScanState(th, h, k, xs)

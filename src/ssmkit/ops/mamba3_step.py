"""Argument checks and the fused (numba) path of :func:`ssmkit.ops.mamba3_step`, one token of Mamba-3's SSM core.

The kernel (:mod:`._numba_mamba3_step`) runs on CPU in float32/float64 when nothing needs a gradient; it reads
memory without bounds checks, so every shape is checked here first, each error naming its argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _numba_mamba3_step as K
from ._checks import check_params, check_same, check_shape, check_tensor
from .linear_scan import compute_dtype
from .threads import kernel_threads

#: the kernel runs a token only below this much work, batch * heads * P * N * (2 R + 1) multiply-adds: its fixed
#: cost is ~2/3 of the torch step's (~0.12 vs ~0.18 ms, one thread, measured on the 2-core dev machine), but per
#: multiply-add it is 2-3x slower than the torch step's contractions (MKL GEMMs with FMA; the kernel keeps the
#: sequence kernel's exact arithmetic, no FMA contraction), so they cross near 2^18 (see docs/mamba3.md)
STEP_KERNEL_MAX_WORK = 1 << 18


def step_work(x: Tensor, state: tuple) -> int:
    """batch * heads * P * N * (2 R + 1): the multiply-adds of one token's state update."""
    batch, H, P, N = state[1].shape
    R = 1 if x.ndim == 3 else x.shape[1]
    return batch * H * P * N * (2 * R + 1)


def check_step(x: Tensor, dt: Tensor, A: Tensor, trap: Tensor, B: Tensor, C: Tensor, state: tuple, angles: Tensor |
               None, B_bias: Tensor | None, C_bias: Tensor | None, D: Tensor | None) -> bool:
    """Check one token's arguments against the state (angle (b, H, S), ssm (b, H, P, N), k, x); returns siso."""
    ssm = check_tensor("state.ssm", state[1], ndim=4, what="(batch, heads, P, N)")
    batch, H, P, N = ssm.shape
    check_tensor("x", x, ndim=(3, 4), what="(batch, heads, P) or (batch, R, heads, P)")
    siso = x.ndim == 3
    if x.shape[0] != batch or x.shape[-2:] != (H, P):
        raise ValueError(f"x {tuple(x.shape)} does not match the state's ssm {tuple(ssm.shape)}: expected "
                         f"({batch}, [R,] {H}, {P})")
    R = 1 if siso else x.shape[1]
    kx = (batch, H) if siso else (batch, R, H)
    S = check_tensor("state.angle", state[0], ndim=3, what="(batch, heads, S)").shape[2]
    check_shape("state.angle", state[0], (batch, H, S), "(batch, heads, S)")
    check_shape("state.k", check_tensor("state.k", state[2]), (*kx, N), "(batch, [R,] heads, N)")
    check_shape("state.x", check_tensor("state.x", state[3]), (*kx, P), "(batch, [R,] heads, P)")
    for name, t in (("dt", dt), ("trap", trap)):
        check_shape(name, check_tensor(name, t), (batch, H), "(batch, heads)")
    check_tensor("A", A, ndim=(1, 2), what="(heads,) or (batch, heads)")
    check_shape("A", A, (H,) if A.ndim == 1 else (batch, H), "(heads,) or (batch, heads)")
    check_tensor("B", B, ndim=x.ndim, what="(batch, groups, N) or (batch, R, groups, N)")
    G = B.shape[-2]
    if G < 1 or H % G:
        raise ValueError(f"B has {G} groups (shape {tuple(B.shape)}), but groups must divide heads={H}")
    check_shape("B", B, (batch, G, N) if siso else (batch, R, G, N), "(batch, [R,] groups, N)")
    check_shape("C", check_tensor("C", C), tuple(B.shape), "like B")
    if 2 * S > N:
        raise ValueError(f"state.angle has S={S} rotation angles but 2 * S must be <= N={N}")
    if angles is not None:
        check_shape("angles", check_tensor("angles", angles), (batch, H, S), "(batch, heads, S) as state.angle")
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        if t is not None:
            check_shape(name, check_tensor(name, t), (H, N) if siso else (H, R, N), "(heads, [R,] N)")
    if D is not None:
        check_shape("D", check_tensor("D", D), (H,), "(heads,)")
    check_same("x", x, dt=dt, trap=trap, B=B, C=C, angles=angles, A=A if A.ndim == 2 else None)
    check_params("x", x, A=A if A.ndim == 1 else None, B_bias=B_bias, C_bias=C_bias, D=D)
    acc = compute_dtype(x.dtype)
    for name, t in zip(("angle", "ssm", "k", "x"), state, strict=True):
        if t.dtype != acc or t.device != x.device:
            raise TypeError(f"state.{name} must be a {acc} tensor on {x.device} (the accumulation dtype of x's "
                            f"{x.dtype}), got {t.dtype} on {t.device}")
    return siso


def fused_step(x: Tensor, dt: Tensor, A: Tensor, trap: Tensor, B: Tensor, C: Tensor, state: tuple, angles: Tensor |
               None, B_bias: Tensor | None, C_bias: Tensor | None, D: Tensor | None, siso: bool):
    """One token by the kernel on checked arguments, computing in the state's dtype. Returns y (x's dtype) and the
    new (angle, ssm, k, x) as new tensors."""
    acc = state[1].dtype
    batch, H, P, N = state[1].shape
    f = (lambda t: t.detach().to(acc).contiguous())  # noqa: E731
    one = (lambda t: f(t.unsqueeze(1) if siso else t))  # noqa: E731  the rank axis
    x5 = one(x).unsqueeze(1)  # (b, 1, R, H, P)
    R = x5.shape[2]
    B5, C5 = one(B).unsqueeze(1), one(C).unsqueeze(1)
    A3 = f(A.expand(batch, H)).unsqueeze(1)
    w = x5.new_zeros(batch, 1, H, state[0].shape[2]) if angles is None else f(angles).unsqueeze(1)
    zero = x5.new_zeros(())
    Bb = f(zero.expand(H, R, N) if B_bias is None else (B_bias.unsqueeze(1) if siso else B_bias))
    Cb = f(zero.expand(H, R, N) if C_bias is None else (C_bias.unsqueeze(1) if siso else C_bias))
    Dv = f(zero.expand(H) if D is None else D)
    th0, h0, k0, x0 = f(state[0]), f(state[1]), one(state[2]), one(state[3])
    y = torch.empty_like(x5)
    th1, h1, k1 = torch.empty_like(th0), torch.empty_like(h0), torch.empty_like(k0)
    with kernel_threads(batch * H * P * N * R * 2):
        K.mamba3_step_kernel(*(t.numpy() for t in (x5, f(dt).unsqueeze(1), A3, f(trap).unsqueeze(1), B5, C5, Bb,
                                                   Cb, w, Dv, x5.new_ones(1), th0, h0, k0, x0, y, th1, h1,
                                                   k1)))
    y, xs = y[:, 0], x5[:, 0]
    if siso:
        y, k1, xs = y[:, 0], k1[:, 0], xs[:, 0]
    return y.to(x.dtype), (th1, h1, k1, xs)

"""Plain loop oracle of :func:`ssmkit.ops.mamba3` (Mamba-3's SSM core): one formula per line, differentiable,
exact in float64. It validates nothing and is slow on purpose.

Per head, with states h (P, N), the previous step's rotated key k~ (R, N) and input x (R, P), and angles th (S,):

    th_t  = th_{t-1} + dt_t w_t                     (wrapped to [0, 2 pi); rotates pairs (2i, 2i+1), i < S)
    k~_tr = Rot(th_t) (B_tr + B_bias_r),  q~_tr = Rot(th_t) (C_tr + C_bias_r)
    alpha = exp(dt_t A_t),  beta = (1 - lam_t) dt_t alpha,  gamma = lam_t dt_t
    h_t   = alpha h_{t-1} + beta sum_r x_{t-1,r} k~_{t-1,r}^T + gamma sum_r x_tr k~_tr^T
    y_tr  = h_t q~_tr + D x_tr
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import reverse_reset


def rotate_pairs(v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first S pairs (2i, 2i+1) of v (..., N) by angles with cos, sin (..., S); the rest unchanged."""
    S = cos.shape[-1]
    if S == 0:
        return v
    head = v[..., : 2 * S].unflatten(-1, (S, 2))
    v0, v1 = head[..., 0], head[..., 1]
    rot = torch.stack((v0 * cos - v1 * sin, v0 * sin + v1 * cos), -1).flatten(-2)
    return torch.cat((rot, v[..., 2 * S:]), -1)


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
    initial_state: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    return_final_state: bool = False,
):
    """Oracle of :func:`ssmkit.ops.mamba3`, same arguments (SISO: x (b, L, H, P), B/C (b, L, G, N); MIMO:
    x (b, L, R, H, P), B/C (b, L, R, G, N)). Returns y, or (y, (angle, ssm, k, x)) in the accumulation dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    siso = B.ndim == 4
    xs = (x.unsqueeze(2) if siso else x).to(acc)  # (b, L, R, H, P)
    Bs = (B.unsqueeze(2) if siso else B).to(acc)  # (b, L, R, G, N)
    Cs = (C.unsqueeze(2) if siso else C).to(acc)
    batch, length, R, H, P = xs.shape
    G, N = Bs.shape[3], Bs.shape[4]
    Bh = Bs.repeat_interleave(H // G, dim=3)  # (b, L, R, H, N)
    Ch = Cs.repeat_interleave(H // G, dim=3)
    if B_bias is not None:
        Bh = Bh + (B_bias.unsqueeze(0) if siso else B_bias.transpose(0, 1)).to(acc)
    if C_bias is not None:
        Ch = Ch + (C_bias.unsqueeze(0) if siso else C_bias.transpose(0, 1)).to(acc)
    dtf, lam = dt.to(acc), trap.to(acc)
    Af = (A.expand(batch, length, H) if A.ndim == 1 else A).to(acc)
    w = (x.new_zeros(batch, length, H, 0, dtype=acc) if angles is None else angles.to(acc))
    S = w.shape[-1]
    if initial_state is None:
        th = xs.new_zeros(batch, H, S)
        h = xs.new_zeros(batch, H, P, N)
        kp = xs.new_zeros(batch, R, H, N)
        xp = xs.new_zeros(batch, R, H, P)
    else:
        th, h, kp, xp = (t.to(acc) for t in initial_state)
        if siso:
            kp, xp = kp.unsqueeze(1), xp.unsqueeze(1)
    r = reverse_reset(reset) if reverse else reset
    order = range(length - 1, -1, -1) if reverse else range(length)
    ys: list[Tensor | None] = [None] * length
    for t in order:
        if r is not None:
            keep = (~r[:, t]).to(acc)
            th, h = th * keep[:, None, None], h * keep[:, None, None, None]
            kp, xp = kp * keep[:, None, None, None], xp * keep[:, None, None, None]
        th = th + dtf[:, t, :, None] * w[:, t]
        th = th - 2 * math.pi * torch.floor(th / (2 * math.pi))
        cos, sin = th.cos().unsqueeze(1), th.sin().unsqueeze(1)  # (b, 1, H, S)
        k = rotate_pairs(Bh[:, t], cos, sin)  # (b, R, H, N)
        q = rotate_pairs(Ch[:, t], cos, sin)
        alpha = torch.exp(dtf[:, t] * Af[:, t])  # (b, H)
        beta = (1 - lam[:, t]) * dtf[:, t] * alpha
        gamma = lam[:, t] * dtf[:, t]
        prev = torch.einsum("brhp,brhn->bhpn", xp, kp)
        cur = torch.einsum("brhp,brhn->bhpn", xs[:, t], k)
        h = alpha[..., None, None] * h + beta[..., None, None] * prev + gamma[..., None, None] * cur
        y = torch.einsum("bhpn,brhn->brhp", h, q)
        if D is not None:
            y = y + D.to(acc)[:, None] * xs[:, t]
        ys[t] = y
        kp, xp = k, xs[:, t]
    y = torch.stack(ys, 1)
    y = (y.squeeze(2) if siso else y).to(x.dtype)
    if not return_final_state:
        return y
    if siso:
        kp, xp = kp.squeeze(1), xp.squeeze(1)
    return y, (th, h, kp, xp)

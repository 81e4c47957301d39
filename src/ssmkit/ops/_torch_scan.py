"""Pure-PyTorch scan paths for devices without the fused CPU kernels (and for anything numba cannot compile).

All functions here are differentiable through autograd and assume validated, same-dtype inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def doubling_scan(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    """Inclusive scan h_t = a_t h_{t-1} + b_t along dim 1 in log2(length) doubling rounds.

    Works for any a (negative, zero, complex) since it never divides or takes logs.
    a, b: (batch, length, ...); h0: (batch, ...) or None.
    """
    if h0 is not None:
        b = torch.cat([(a[:, :1] * h0.unsqueeze(1)) + b[:, :1], b[:, 1:]], 1)
    length = b.shape[1]
    offset = 1
    while offset < length:
        b = torch.cat([b[:, :offset], b[:, offset:] + a[:, offset:] * b[:, :-offset]], 1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], 1)
        offset *= 2
    return b


def selective_scan_chunked(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor | None, h0: Tensor | None, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """S6 core y_t = C_t h_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, processed chunk by chunk.

    u, dt: (batch, length, dim); A: (dim, N); B, C: (batch, length, groups, N); keep: (batch, length) 0/1
    multiplier of the carried state, or None. A, B, C (and h0) may be complex: y and the state are then complex.
    Only one chunk's (batch, chunk, dim, N) tensors exist at a time in the forward pass.
    Returns y (batch, length, dim) and the final state (batch, dim, N).
    """
    batch, length, dim = u.shape
    rep = dim // B.shape[2]
    h = u.new_zeros(batch, dim, A.shape[1], dtype=A.dtype) if h0 is None else h0
    ys = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        dA = torch.exp(dt[:, s:e, :, None] * A)
        if keep is not None:
            dA = dA * keep[:, s:e, None, None]
        dBu = (dt[:, s:e] * u[:, s:e]).unsqueeze(-1) * B[:, s:e].repeat_interleave(rep, dim=2)
        hs = doubling_scan(dA, dBu, h)
        ys.append((hs * C[:, s:e].repeat_interleave(rep, dim=2)).sum(-1))
        h = hs[:, -1]
    return torch.cat(ys, 1), h

"""Mamba-2's gated RMSNorm, fused (numba, CPU): out = w * n, n = g / rms(g) per group, g = silu(z) * y.

    out = gated_rms_norm(y, z, weight, group_size, eps)

y, z (..., dim), weight (dim,), one dtype (float32/float64), dim a multiple of group_size. silu(z) and its
derivative run in torch (vectorised exps: silu forward, silu_backward); the product, the per-group sum of squares,
the scaling and the whole backward of the norm are one serial sweep each way, in a fixed order (fma), instead of
autograd's ~8 passes forward and ~12 backward (mul, pow, mean, rsqrt, mul, mul and their backwards). The weight's
gradient is summed over rows in order, so results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._numba_kernels import EXACT_MATH, fma


@nb.njit(fastmath=EXACT_MATH, cache=True)
def norm_fwd(s, y, w, gs, eps, out, rstd):
    """out[i, j] = w[j] s[i, j] y[i, j] rstd[i, k] for j in group k; rstd = 1 / sqrt(mean_group(g^2) + eps)."""
    rows, dim = y.shape
    zero = np.zeros(1, dtype=y.dtype)[0]
    for i in range(rows):
        for k in range(dim // gs):
            acc = zero
            for j in range(k * gs, (k + 1) * gs):
                g = s[i, j] * y[i, j]
                acc = fma(g, g, acc)
            rstd[i, k] = 1.0 / math.sqrt(acc / gs + eps)
            r = rstd[i, k]  # in y's dtype
            for j in range(k * gs, (k + 1) * gs):
                out[i, j] = w[j] * (s[i, j] * y[i, j] * r)


@nb.njit(fastmath=EXACT_MATH, cache=True)
def norm_bwd(go, s, y, w, rstd, gs, gy, gsil, gw):
    """With n = g rstd, g = s y: gw += go n (rows in order); gg = rstd (go w - n mean_group(go w n));
    gy = gg s; gsil = gg y."""
    rows, dim = y.shape
    zero = np.zeros(1, dtype=y.dtype)[0]
    tmp = np.empty(1, dtype=y.dtype)
    for i in range(rows):
        for k in range(dim // gs):
            r = rstd[i, k]
            dot = zero
            for j in range(k * gs, (k + 1) * gs):
                n = s[i, j] * y[i, j] * r
                gw[j] = fma(go[i, j], n, gw[j])
                dot = fma(go[i, j] * w[j], n, dot)
            tmp[0] = dot / gs
            c = tmp[0]  # in y's dtype
            for j in range(k * gs, (k + 1) * gs):
                n = s[i, j] * y[i, j] * r
                gg = r * (go[i, j] * w[j] - n * c)
                gy[i, j] = gg * s[i, j]
                gsil[i, j] = gg * y[i, j]


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float):
        dim = y.shape[-1]
        s = F.silu(z.detach()).reshape(-1, dim)  # contiguous
        y2, w = y.detach().reshape(-1, dim).contiguous(), weight.detach().contiguous()
        out = torch.empty_like(y2)
        rstd = y2.new_empty(y2.shape[0], dim // group_size)
        norm_fwd(s.numpy(), y2.numpy(), w.numpy(), group_size, eps, out.numpy(), rstd.numpy())
        ctx.group_size = group_size
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(s, y2, w, rstd, z)
        return out.view(y.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go: Tensor):
        s, y2, w, rstd, z = ctx.saved_tensors
        go2 = go.reshape(y2.shape).contiguous()
        gy, gsil, gw = torch.empty_like(y2), torch.empty_like(y2), torch.zeros_like(w)
        norm_bwd(go2.numpy(), s.numpy(), y2.numpy(), w.numpy(), rstd.numpy(), ctx.group_size, gy.numpy(),
                 gsil.numpy(), gw.numpy())
        gz = torch.ops.aten.silu_backward(gsil.view(z.shape), z.detach()) if ctx.needs_input_grad[1] else None
        return gy.view(z.shape), gz, gw, None, None


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """See the module docstring; the caller checks shapes, dtypes (one of float32/float64) and the device (CPU)."""
    return _GatedNorm.apply(y, z, weight, group_size, eps)

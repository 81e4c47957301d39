"""Oracles of :func:`ssmkit.ops.mamba2_step.mamba2_step` and :func:`~ssmkit.ops.mamba2_step.mamba2_stack_step`:
one formula per line, loops over heads, in x's dtype (float64 for exact checks). They validate nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _lin(v: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """v @ W.T + bias with W the float weight, int8 times per-row scales, or unpacked int4 times group scales."""
    dt_ = v.dtype
    if scale is None:
        wf = weight.to(dt_)
    elif scale.ndim == 1:
        wf = weight.to(dt_) * scale.to(dt_)[:, None]
    else:  # packed int4: byte j of a group holds weight j (low nibble) and weight j + group / 2 (high nibble)
        out_f, n_bytes = weight.shape
        groups = scale.shape[1]
        half = n_bytes // groups
        byte = weight.to(torch.int64) & 255
        lo, hi = (byte & 15) - 8, (byte >> 4) - 8
        wf = torch.empty(out_f, 2 * n_bytes, dtype=dt_)
        for g in range(groups):
            wf[:, 2 * half * g: 2 * half * g + half] = lo[:, half * g: half * (g + 1)].to(dt_) * scale[:, g:g + 1]
            wf[:, 2 * half * g + half: 2 * half * (g + 1)] = hi[:, half * g: half * (g + 1)].to(dt_) * scale[:, g:g + 1]
    out = torch.einsum("bk,ok->bo", v, wf)
    return out if bias is None else out + bias.to(dt_)


def _lin_q(v: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, act_quant: bool) -> Tensor:
    """:func:`_lin`, on ssmkit.ops.reference.q8_activations(v) for a quantized weight when ``act_quant``."""
    if act_quant and scale is not None:
        from .reference import q8_activations

        v = q8_activations(v)
    return _lin(v, weight, scale, bias)


def mamba2_step(x: Tensor, w, conv_state: Tensor, ssm_state: Tensor, act_quant: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    """One token (w: a Mamba2StepWeights): x (batch, d_model) -> (y, new conv_state, new ssm_state);
    ``act_quant``: quantized weights multiply activations quantized per block of 32."""
    dt_ = x.dtype
    di, n_conv, heads, p, n = w.dims()
    g = w.ngroups
    zxbcdt = _lin_q(x, w.in_w, w.in_scale, w.in_b, act_quant)
    z, xbc, dt_raw = zxbcdt[:, :di], zxbcdt[:, di:di + n_conv], zxbcdt[:, di + n_conv:]
    window = torch.cat([conv_state.to(dt_), xbc[:, :, None]], dim=2)  # oldest first, newest last
    conv = torch.einsum("bck,ck->bc", window, w.conv_w.to(dt_))
    if w.conv_b is not None:
        conv = conv + w.conv_b.to(dt_)
    u = conv * torch.sigmoid(conv)
    xs, B, C = u[:, :di], u[:, di:di + g * n], u[:, di + g * n:]
    dt = F.softplus(dt_raw + w.dt_b.to(dt_)).clamp(min=w.dt_limit[0], max=w.dt_limit[1])
    new = torch.empty(x.shape[0], heads, p, n, dtype=dt_)
    y = torch.empty(x.shape[0], di, dtype=dt_)
    for hh in range(heads):
        grp = hh // (heads // g)
        decay = torch.exp(-dt[:, hh] * torch.exp(w.a_log[hh].to(dt_)))  # (batch,)
        xh = xs[:, hh * p:(hh + 1) * p]  # (batch, P)
        Bg, Cg = B[:, grp * n:(grp + 1) * n], C[:, grp * n:(grp + 1) * n]  # (batch, N)
        new[:, hh] = decay[:, None, None] * ssm_state[:, hh].to(dt_) + (dt[:, hh, None] * xh)[:, :, None] * Bg[:, None]
        y[:, hh * p:(hh + 1) * p] = (new[:, hh] * Cg[:, None]).sum(-1) + w.d[hh].to(dt_) * xh
    gated = y * (z * torch.sigmoid(z))
    normed = torch.empty_like(gated)
    size = di // g
    for grp in range(g):
        part = gated[:, grp * size:(grp + 1) * size]
        normed[:, grp * size:(grp + 1) * size] = part / torch.sqrt((part * part).mean(-1, keepdim=True) + w.norm_eps)
    return _lin_q(normed * w.norm_w.to(dt_), w.out_w, w.out_scale, w.out_b, act_quant), window[:, :, 1:], new


def mamba2_stack_step(h: Tensor, layers, norm_weights, eps: float, final_weight: Tensor | None, final_eps: float,
                      conv_states, ssm_states, head=None, act_quant: bool = False):
    """h <- h + mamba2_step(rmsnorm(h)) block by block, the final RMSNorm, then the optional head (weight,
    scale or None, bias or None). Returns (hidden, convs, ssms, logits or None). ``act_quant``: quantized
    weights multiply activations quantized per block of 32."""

    def rms(v: Tensor, wt: Tensor | None, e: float) -> Tensor:
        return v if wt is None else v / torch.sqrt((v * v).mean(-1, keepdim=True) + e) * wt.to(v.dtype)

    convs, ssms = [], []
    for i, w in enumerate(layers):
        y, c, s = mamba2_step(rms(h, None if norm_weights is None else norm_weights[i], eps), w, conv_states[i],
                              ssm_states[i], act_quant)
        h = h + y
        convs.append(c)
        ssms.append(s)
    hidden = rms(h, final_weight, final_eps)
    logits = None if head is None else _lin_q(hidden, *head, act_quant)
    return hidden, convs, ssms, logits

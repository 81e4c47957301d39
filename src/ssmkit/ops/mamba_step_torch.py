"""The Mamba decode step in torch ops (:func:`_torch_step`, differentiable, any dtype and device) and a stack
plan's step block by block (:func:`stack_by_blocks`): the paths when the fused kernel does not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .decode_linear import dequantized
from .mamba_step_weights import MambaStepWeights
from .q8_act import q8_dequant


def _weight(w: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    return dequantized(w, scale, dtype)


def _act(x: Tensor, scale: Tensor | None, act_quant: bool) -> Tensor:
    """x as a quantized weight's product sees it: quantized per block of 32 with ``act_quant``
    (:func:`ssmkit.ops.q8_act.q8_dequant`), else x itself."""
    if not act_quant or scale is None:
        return x
    return q8_dequant(x)


def _torch_step(x: Tensor, w: MambaStepWeights, conv_state: Tensor, ssm_state: Tensor, act_quant: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The step in torch ops (differentiable; 16-bit inputs accumulate the scan in ssm_state's dtype);
    ``act_quant``: the quantized weights multiply activations quantized per block of 32."""
    di = w.d.shape[0]
    rank = w.dt_w.shape[1]
    n_state = w.a_log.shape[1]
    xi, z = F.linear(_act(x, w.in_scale, act_quant), _weight(w.in_w, w.in_scale, x.dtype), w.in_b).split(
        di, dim=-1)
    window = torch.cat([conv_state, xi.unsqueeze(-1)], -1)  # (batch, Di, K)
    u = (window * w.conv_w).sum(-1)
    if w.conv_b is not None:
        u = u + w.conv_b
    u = F.silu(u)
    dt_low, B, C = F.linear(_act(u, w.x_scale, act_quant), _weight(w.x_w, w.x_scale, x.dtype)).split(
        [rank, n_state, n_state], dim=-1)
    acc = ssm_state.dtype
    dt = F.softplus(F.linear(dt_low, w.dt_w, w.dt_b).to(acc))
    uf = u.to(acc)
    dA = torch.exp(dt.unsqueeze(-1) * -torch.exp(w.a_log.to(acc)))  # (batch, Di, N)
    h = torch.addcmul(ssm_state * dA, (dt * uf).unsqueeze(-1), B.to(acc).unsqueeze(1))
    y = torch.bmm(h, C.to(acc).unsqueeze(-1)).squeeze(-1)
    y = torch.addcmul(y, uf, w.d.to(acc)) * F.silu(z.to(acc))
    y = _act(y.to(x.dtype), w.out_scale, act_quant)
    return F.linear(y, _weight(w.out_w, w.out_scale, x.dtype), w.out_b), window[:, :, 1:], h


def _rms_norm(h: Tensor, w: Tensor | None, eps: float) -> Tensor:
    return h if w is None else h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def stack_by_blocks(h: Tensor, plan, conv_states: list[Tensor], ssm_states: list[Tensor], step
                    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """A stack plan's step block by block in torch ops (differentiable; the path when the kernel does not apply):
    h <- h + step(rmsnorm(h)) per layer, the final norm, and the head if the plan has one. ``step(x, weights,
    conv_state, ssm_state, act_quant) -> (y, conv_state, ssm_state)`` is the family's one-layer step."""
    convs, ssms = [], []
    for i, w in enumerate(plan.layers):
        norm = None if plan.norm_weights is None else plan.norm_weights[i]
        y, c, s = step(_rms_norm(h, norm, plan.eps), w, conv_states[i], ssm_states[i], plan.act_quant)
        h = h + y if plan.residual else y
        convs.append(c)
        ssms.append(s)
    hidden = _rms_norm(h, plan.final_weight, plan.final_eps)
    logits = None
    if plan.head is not None:
        hw, hs, hb = plan.head
        logits = F.linear(_act(hidden, hs, plan.act_quant), dequantized(hw, hs, hidden.dtype), hb)
    return hidden, convs, ssms, logits

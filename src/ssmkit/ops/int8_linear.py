"""Weight-only int8 linear layers for decoding: per-output-channel symmetric quantization and its product.

    q, scale = quantize_int8(weight)          # weight (out, in) float -> q (out, in) int8, scale (out,) float32
    y = int8_linear(x, q, scale, bias)        # x (..., in) float32 -> (..., out) float32

Decoding one token reads every weight once, so its speed is set by memory bandwidth; int8 weights move a
quarter of the bytes of float32 ones. Activations and accumulation stay float32 (weight-only quantization):
``int8_linear`` equals ``F.linear(x, q * scale[:, None], bias)`` up to float32 summation order. On CPU, inputs
with few rows (decode batches, at most :data:`GEMV_MAX_ROWS`) run the fused kernel of
:func:`ssmkit.ops.decode_linear.decode_linear`; larger inputs (a prefill) dequantize the weight and use
``F.linear``; so do other devices and inputs that need gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decode_linear import DECODE_MAX_ROWS, decode_linear

#: rows (product of the leading dims of x) up to which the fused matrix-vector kernel runs
GEMV_MAX_ROWS = DECODE_MAX_ROWS


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) float -> (q (out, in) int8, scale (out,) float32) with q = round(w / scale) in
    [-127, 127], scale = max|w_row| / 127 (1 for all-zero rows). The error per weight is at most scale / 2."""
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        got = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"quantize_int8: weight must be a float tensor (out, in), got {got}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int8: weight holds non-finite values")
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])  # no inputs: all-zero rows
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """(out, in) float32 weight of ``q`` and ``scale``."""
    return q.float() * scale[:, None]


def _check(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    if not isinstance(q, Tensor) or q.dtype != torch.int8 or q.ndim != 2:
        got = f"{tuple(q.shape)} {q.dtype}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"int8_linear: q must be an int8 tensor (out, in), got {got}")
    out_f, in_f = q.shape
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (out_f,):
        got = f"{tuple(scale.shape)} {scale.dtype}" if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"int8_linear: scale must be float32 of shape ({out_f},), got {got}")
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.ndim < 1 or x.shape[-1] != in_f:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"int8_linear: x must be float32 (..., {in_f}), got {got}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (out_f,)):
        got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"int8_linear: bias must be None or float32 of shape ({out_f},), got {got}")
    devices = {t.device for t in (x, q, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"int8_linear: x, q, scale and bias must be on one device, got {sorted(map(str, devices))}")


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                act_quant: bool = False) -> Tensor:
    """``x @ (q * scale[:, None]).T + bias``: x (..., in) float32, q (out, in) int8, scale (out,) float32,
    bias (out,) float32 or None -> (..., out) float32 (see the module docstring). ``act_quant``: x is first
    quantized per block of 32 and the products are integer (:mod:`ssmkit.ops.q8_act`)."""
    _check(x, q, scale, bias)
    return decode_linear(x, q, bias, scale=scale, act_quant=act_quant)

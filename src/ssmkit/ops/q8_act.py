"""Integer activations for the quantized decode products (llama.cpp's q8_0 activation blocks), in torch ops.

    xr = q8_dequant(x)                           # x (..., K) float -> the same shape and dtype
    y = q8_linear(x, weight, bias, scale=scale)  # int8 (per-row scale) or packed int4 (2-D scale) weights

With activation quantization on (``quantize_weights(..., activations="int8")``), an int8 or int4 weight multiplies
x quantized per block of :data:`QBLOCK` inputs (the last block shorter when K is not a multiple):
``d = max|x_block| / 127`` (0 for an all-zero block) and ``q = round_half_even(x / d)`` in [-127, 127], every
operation in x's dtype. The numba decode kernels sum each block's integer products exactly (int32) and scale the
sum by ``d`` (:mod:`ssmkit.ops._numba_q8`); these torch ops give the same numbers up to float summation order
(prefill, gradients, other devices). Oracle: :func:`ssmkit.ops.reference.q8_activations`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .decode_linear import dequantized

__all__ = ["QBLOCK", "act_quant_of", "module_act_quant", "quantized_layers", "q8_dequant", "q8_linear", "q8_quantize"]

QBLOCK = 32  #: activation inputs per scale (llama.cpp's q8_0 block)


def q8_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) float -> (q (..., K) int8, d (..., ceil(K / QBLOCK)) x's dtype) (module docstring)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"q8_quantize: x must be a float tensor (..., K), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    k = x.shape[-1]
    pad = (-k) % QBLOCK
    xb = F.pad(x, (0, pad)).unflatten(-1, (-1, QBLOCK))  # zeros do not change a block's max
    d = xb.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, torch.round(xb / torch.where(d > 0, d, 1)[..., None]), 0)
    return q.flatten(-2)[..., :k].to(torch.int8), d


def q8_dequant(x: Tensor) -> Tensor:
    """The activations the integer products see: q * d per block, in x's dtype and shape."""
    q, d = q8_quantize(x)
    k = x.shape[-1]
    return (q.to(x.dtype) * d.repeat_interleave(QBLOCK, -1)[..., :k])


def q8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale: Tensor) -> Tensor:
    """``F.linear(q8_dequant(x), w, bias)`` with w the dequantized int8 (1-D scale) or int4 (2-D scale) weight."""
    return F.linear(q8_dequant(x), dequantized(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def quantized_layers(*modules: object) -> tuple:
    """The layers with a bool ``act_quant`` attribute (ssmkit.infer's Int8Linear / Int4Linear) in ``modules``
    (``nn.Module``s; anything else, e.g. None, is skipped), each once."""
    found = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for m in module.modules():
                if isinstance(getattr(m, "act_quant", None), bool):
                    found[id(m)] = m
    return tuple(found.values())


def act_quant_of(layers: tuple, where: str = "module_act_quant") -> bool:
    """The one ``act_quant`` setting of ``layers`` (False for none); a ValueError naming ``where`` if they
    disagree (a fused step takes one setting)."""
    flags = {m.act_quant for m in layers}
    if len(flags) > 1:
        raise ValueError(f"{where}: the quantized layers disagree on act_quant; set it on all of them")
    return flags == {True}


def module_act_quant(module: object) -> bool:
    """Whether the quantized linear layers in ``module`` quantize their activations (see :func:`act_quant_of`)."""
    return act_quant_of(quantized_layers(module))

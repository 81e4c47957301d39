"""Weight-only int4 linear layers with group-wise scales, packed two weights per byte.

    packed, scale = quantize_int4(weight, group_size=32)   # weight (out, in) -> packed (out, in / 2) int8 bytes,
                                                            #   scale (out, in / group_size) float32
    w = dequantize_int4(packed, scale)                      # (out, in) float32
    y = int4_linear(x, packed, scale, bias)                 # x (..., in) float32 -> (..., out) float32

Quantization is symmetric per group of ``group_size`` consecutive inputs of a row: scale = max|w_group| / 7
(1 for an all-zero group) and q = round(w / scale) in [-7, 7], so each weight is off by at most scale / 2.
Storage (torch has no 4-bit dtype, and ssmkit's layers take quantized weights as int8 tensors): q + 8 is a nibble
(1..15); in group g, byte j (0 <= j < group_size / 2) of the row holds input ``g * group_size + j`` in its low
nibble and input ``g * group_size + group_size / 2 + j`` in its high nibble (ggml's q4_0 order), so a kernel
reads the two halves of x contiguously. A 2-D scale is what tells int4 from int8 (whose scale is per row).

On CPU, decode-sized inputs (at most :data:`GEMV_MAX_ROWS` rows, no gradient) run the fused numba GEMV of
:func:`ssmkit.ops.decode_linear.decode_linear`, which unpacks the nibbles in registers; larger inputs (a prefill),
other devices and inputs that need gradients dequantize and call ``F.linear``. Oracle: ``F.linear`` on
:func:`dequantize_int4` in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decode_linear import DECODE_MAX_ROWS, decode_linear, dequantized

#: rows (product of the leading dims of x) up to which the fused matrix-vector kernel runs
GEMV_MAX_ROWS = DECODE_MAX_ROWS
#: group sizes the kernels accept
GROUP_SIZES = (16, 32, 64, 128)


def _desc(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def quantize_int4(weight: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """weight (out, in) float, ``in`` a multiple of ``group_size`` (one of :data:`GROUP_SIZES`) ->
    (packed (out, in / 2) int8 bytes, scale (out, in / group_size) float32); see the module docstring."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int4: weight must be a float tensor (out, in), got {_desc(weight)}")
    out_f, in_f = weight.shape
    if in_f == 0 or in_f % group_size:
        raise ValueError(f"quantize_int4: weight's in_features must be a positive multiple of group_size "
                         f"{group_size}, got {in_f}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int4: weight holds non-finite values")
    groups = w.reshape(out_f, in_f // group_size, group_size)
    amax = groups.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.round(groups / scale[..., None]).clamp_(-7, 7).to(torch.int16) + 8  # nibbles 1..15
    half = group_size // 2
    byte = q[..., :half] | (q[..., half:] << 4)  # (out, groups, half) in 0..255
    packed = byte.to(torch.uint8).view(torch.int8).reshape(out_f, in_f // 2)
    return packed.contiguous(), scale.contiguous()


def _check_packed(where: str, packed: Tensor, scale: Tensor) -> None:
    if not isinstance(packed, Tensor) or packed.dtype != torch.int8 or packed.ndim != 2:
        raise ValueError(f"{where}: packed must be an int8 tensor (out, in / 2), got {_desc(packed)}")
    out_f, n_bytes = packed.shape
    if (not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.ndim != 2
            or scale.shape[0] != out_f or scale.shape[1] == 0 or (2 * n_bytes) % scale.shape[1]
            or 2 * n_bytes // scale.shape[1] not in GROUP_SIZES):
        raise ValueError(f"{where}: scale must be float32 ({out_f}, in / group_size) with group_size in "
                         f"{GROUP_SIZES}, got {_desc(scale)} for packed {tuple(packed.shape)}")


def dequantize_int4(packed: Tensor, scale: Tensor) -> Tensor:
    """(out, in) float32 weight of ``packed`` and ``scale`` (module docstring)."""
    _check_packed("dequantize_int4", packed, scale)
    return dequantized(packed, scale, torch.float32)


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                act_quant: bool = False) -> Tensor:
    """``x @ dequantize_int4(packed, scale).T + bias``: x (..., in) float32, bias (out,) float32 or None ->
    (..., out) float32 (module docstring). ``act_quant``: x is first quantized per block of 32 and the products
    are integer (:mod:`ssmkit.ops.q8_act`)."""
    _check_packed("int4_linear", packed, scale)
    out_f, n_bytes = packed.shape
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.ndim < 1 or x.shape[-1] != 2 * n_bytes:
        raise ValueError(f"int4_linear: x must be float32 (..., {2 * n_bytes}), got {_desc(x)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype != torch.float32
                             or tuple(bias.shape) != (out_f,)):
        raise ValueError(f"int4_linear: bias must be None or float32 of shape ({out_f},), got {_desc(bias)}")
    devices = {t.device for t in (x, packed, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"int4_linear: x, packed, scale and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    return decode_linear(x, packed, bias, scale=scale, act_quant=act_quant)

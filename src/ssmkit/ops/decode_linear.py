"""``F.linear`` for decode-sized inputs (a few rows), e.g. the LM head of a generation step.

    y = decode_linear(x, weight, bias)                 # x (..., in) -> (..., out)
    y = decode_linear(x, q, bias, scale=scale)         # int8 weight-only: q (out, in) int8, scale (out,)
    y = decode_linear(x, p, bias, scale=scale)         # int4: p (out, in / 2) packed, scale (out, in / group)

A decode step reads every weight once for a handful of rows, so it is bound by memory bandwidth. On CPU, float32
and float64 inputs with at most :data:`DECODE_MAX_ROWS` rows that need no gradient run one numba launch in which
the threads claim chunks of output rows; each weight row is read once for all input rows. Everything else calls
``F.linear`` (on the dequantized weight for int8 and int4). Oracles: ``F.linear`` and
:func:`ssmkit.ops.reference.int8_linear`; for int4 (:mod:`ssmkit.ops.int4_linear`), ``F.linear`` on the
dequantized weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear_scan import use_fused
from .threads import kernel_threads

#: rows (product of the leading dims of x) up to which the fused kernel runs
DECODE_MAX_ROWS = 32


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None) -> None:
    def desc(t: object) -> str:
        return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__

    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"decode_linear: weight must be a tensor (out, in), got {desc(weight)}")
    out_f, in_f = weight.shape
    packed = isinstance(scale, Tensor) and scale.ndim == 2  # int4: two weights per byte, group-wise scales
    if packed:
        in_f *= 2
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != in_f or not x.is_floating_point():
        raise ValueError(f"decode_linear: x must be a float tensor (..., {in_f}), got {desc(x)}")
    if scale is None:
        if weight.dtype != x.dtype:
            raise ValueError(f"decode_linear: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    else:
        if weight.dtype != torch.int8:
            raise ValueError(f"decode_linear: with a scale, weight must be int8, got {weight.dtype}")
        groups = scale.shape[1] if packed and scale.shape[1] > 0 else 0
        if not isinstance(scale, Tensor) or not scale.is_floating_point() or scale.shape[0] != out_f or (
                packed and (groups == 0 or in_f % groups or (in_f // groups) % 2)):
            raise ValueError(f"decode_linear: scale must be a float tensor ({out_f},) (int8) or ({out_f}, groups) "
                             f"with groups dividing in_features {in_f} into even groups (int4), got {desc(scale)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_f,)):
        raise ValueError(f"decode_linear: bias must be None or a tensor ({out_f},), got {desc(bias)}")
    devices = {t.device for t in (x, weight, bias, scale) if t is not None}
    if len(devices) > 1:
        raise ValueError("decode_linear: x, weight, bias and scale must be on one device, "
                         f"got {sorted(map(str, devices))}")


def dequantized(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight in ``dtype``: ``weight`` itself (float), int8 times per-row scales, or unpacked int4
    times group scales (a 2-D scale)."""
    if scale is None:
        return weight
    if scale.ndim == 2:
        out_f, n_bytes = weight.shape
        n_groups = scale.shape[1]
        b = weight.view(torch.uint8).to(torch.int16).reshape(out_f, n_groups, n_bytes // n_groups)
        q = torch.cat([(b & 15) - 8, (b >> 4) - 8], dim=2).to(dtype)
        return (q * scale.to(dtype)[..., None]).reshape(out_f, 2 * n_bytes)
    return weight.to(dtype) * scale.to(dtype)[:, None]


def decode_fusable(x: Tensor, tensors: list[Tensor]) -> bool:
    """Whether the decode kernels can take these tensors: CPU, x float32/float64 and every tensor x's dtype or
    int8 (weights), kernels switched on, and no gradient needed."""
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype not in (x.dtype, torch.int8) for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return use_fused(*tensors)


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale: Tensor | None = None,
                  act_quant: bool = False) -> Tensor:
    """``x @ w.T + bias`` with w = weight, or ``weight * scale[:, None]`` for int8 weights: x (..., in) ->
    (..., out) (see the module docstring). ``act_quant``: a quantized weight multiplies x quantized per block
    of 32 (:mod:`ssmkit.ops.q8_act`; float weights ignore it)."""
    _check(x, weight, bias, scale)
    if not isinstance(act_quant, bool):
        raise ValueError(f"decode_linear: act_quant must be a bool, got {act_quant!r}")
    act_quant = act_quant and scale is not None
    tensors = [t for t in (x, weight, bias, scale) if t is not None]
    rows = math.prod(x.shape[:-1])
    # the kernel needs a row to read (in_features 0 gives bias, or zeros, through F.linear)
    if not (0 < rows <= DECODE_MAX_ROWS and weight.shape[1] > 0 and decode_fusable(x, tensors)):
        if act_quant and weight.shape[1] > 0:
            from .q8_act import q8_linear

            return q8_linear(x, weight, bias, scale=scale)
        return F.linear(x, dequantized(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))
    from . import _numba_decode as D

    def arr(t: Tensor | None):
        return x.new_empty(0).numpy() if t is None else t.detach().contiguous().numpy()

    out = x.new_empty(rows, weight.shape[0])
    with kernel_threads(weight.numel() * rows) as threads:
        counters = torch.zeros(D.counter_slots(1, threads), dtype=torch.int64)
        D.linear(arr(x.reshape(rows, x.shape[-1])), arr(weight), arr(scale), arr(bias), out.numpy(),
                 counters.numpy(), threads, act_quant)
    return out.reshape(*x.shape[:-1], weight.shape[0])

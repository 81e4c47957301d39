"""Quamba-style W8A8: int8 weights and int8 activations with static scales, integer matrix products.

    q = quantize_w8a8(model, calibration_batches)        # a new model; ``model`` is unchanged
    logits = q(input_ids).logits

Every ``nn.Linear`` but Mamba's ``dt_proj`` becomes a :class:`W8A8Linear`:
- weights int8 with one scale per output row (:func:`ssmkit.ops.quantize_int8`);
- its input is quantized per tensor with a static scale s = c / 127 fixed from a calibration set (the model run
  on ``calibration_batches``): c is the largest |x| seen, except for Mamba's ``x_proj``, whose input is the SSM
  input u: there c is the ``percentile`` of |u| (averaged over batches), so rare outliers are clipped instead of
  stretching the scale for every other value;
- ``out_proj`` (the SSM output, whose channels hold the largest outliers) first rotates its input by an
  orthonormal block Hadamard matrix H (blocks of the largest power of two dividing in_features, at most
  :data:`MAX_BLOCK`), and its weight is stored rotated (W H), so in exact arithmetic the product is unchanged
  ((x H)(W H)^T = x W^T) while the outliers are spread over a block;
- the product is int8 x int8 -> int32 (``torch._int_mm``), then scaled back: y = acc * s_x * s_w + bias.

What stays float: embeddings, norms, convolutions, dt_proj, the scan itself (the SSM input feeding the scan is
quantized only where it enters x_proj; the scan runs inside the layer). The model runs its forward (prefill,
scoring) and its recurrent ``step`` (``generate``) in W8A8 with the same static scales and integer products
(:mod:`ssmkit.infer.w8a8_step`): decoding takes the block-by-block path, not the fused one-launch kernel. A W8A8
model cast to float64 (``q.double()``) keeps its int8 codes and static scales and rescales in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..models.heads import SequenceModel
from ..ops.int8_linear import quantize_int8
from .quantize import check_float_model, linear_targets, replace_module
from .w8a8_step import enable_w8a8_step

#: largest Hadamard block
MAX_BLOCK = 512
#: inputs clipped at a percentile of |x| (Mamba's SSM input)
CLIPPED = frozenset({"x_proj"})
#: inputs rotated by a Hadamard matrix before quantization
ROTATED = frozenset({"out_proj"})

_HADAMARD: dict[tuple[int, torch.dtype], Tensor] = {}


def hadamard_block(n: int) -> int:
    """The block size for ``n`` features: the largest power of two dividing n, at most :data:`MAX_BLOCK`."""
    return min(n & -n, MAX_BLOCK)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Sylvester Hadamard matrix (n, n), n a power of two: symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    key = (n, dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(dtype)
    return _HADAMARD[key]


def hadamard_rotate(x: Tensor, block: int) -> Tensor:
    """x (..., n) -> x @ blockdiag(H, ..., H) with H = hadamard_matrix(block); n a multiple of block."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"hadamard_rotate: the last dim {n} must be a multiple of block {block}")
    h = hadamard_matrix(block, x.dtype).to(x.device)
    return (x.reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape)


def quantize_activation(x: Tensor, scale: float) -> Tensor:
    """x float -> int8 round(x / scale) clamped to [-127, 127] (values beyond 127 * scale are clipped)."""
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8)


class W8A8Linear(nn.Module):
    """int8 weight ``qweight`` (out, in) with per-row ``w_scale`` (out,), a static input scale ``x_scale``, an
    optional Hadamard rotation of the input (``block`` > 0; ``qweight`` then holds W H) and a float32 bias.
    forward: x (..., in) float32 -> (..., out) float32 (module docstring)."""

    def __init__(self, qweight: Tensor, w_scale: Tensor, x_scale: float, bias: Tensor | None, block: int) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.x_scale, self.block = float(x_scale), int(block)
        self.register_buffer("qweight_t", qweight.t().contiguous())  # (in, out): _int_mm's second operand
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, x_scale: float, rotate: bool) -> W8A8Linear:
        if not (math.isfinite(x_scale) and x_scale > 0):
            raise ValueError(f"W8A8Linear.from_linear: x_scale must be a positive finite float, got {x_scale}")
        w = linear.weight.detach().float()
        block = hadamard_block(w.shape[1]) if rotate else 0
        if block:
            w = hadamard_rotate(w.double(), block).float()
        q, s = quantize_int8(w)
        return cls(q, s, x_scale, linear.bias, block)

    def rotate(self, x: Tensor) -> Tensor:
        return hadamard_rotate(x, self.block) if self.block else x

    def int_product(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., in) in the scales' dtype (float32, or float64 after ``.double()``) -> (the int8 codes of
        the (rotated) input (rows, in), their exact int32 product with the weight codes (rows, out))."""
        dtype = self.w_scale.dtype
        if (not isinstance(x, Tensor) or x.dtype != dtype or dtype not in (torch.float32, torch.float64)
                or x.ndim < 1 or x.shape[-1] != self.in_features):
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"W8A8Linear: x must be {str(dtype).removeprefix('torch.')} (..., {self.in_features}) "
                             f"like its scales, got {got}")
        xq = quantize_activation(self.rotate(x), self.x_scale).reshape(-1, self.in_features)
        return xq, int8_matmul(xq, self.qweight_t)

    def forward(self, x: Tensor) -> Tensor:
        _, acc = self.int_product(x)
        y = acc.to(x.dtype) * (self.w_scale * self.x_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, x_scale={self.x_scale:.4g}, "
                f"hadamard_block={self.block}, w8a8")


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (m, k) int8 @ b (k, n) int8 -> (m, n) int32, exact: ``torch._int_mm`` where it runs, else int32 matmul."""
    if a.shape[0] == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return a.to(torch.int32) @ b.to(torch.int32)


@torch.no_grad()
def calibrate(model: SequenceModel, batches: Iterable[dict[str, Tensor] | Tensor], percentile: float = 99.99
              ) -> dict[str, float]:
    """{layer name: clipping value c} for every layer :func:`quantize_w8a8` replaces: the largest |input| over
    the batches (after the Hadamard rotation for :data:`ROTATED` layers), or for :data:`CLIPPED` layers the
    ``percentile`` of |input| averaged over batches. A batch is a tensor of input ids or a dict of model keyword
    arguments."""
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise ValueError(f"calibrate: percentile must be in (0, 100], got {percentile!r}")
    targets = linear_targets(model)
    stats: dict[str, list[float]] = {name: [] for name, _ in targets}

    def hook(name: str, layer: nn.Linear):
        clipped, rotated = name.rpartition(".")[2] in CLIPPED, name.rpartition(".")[2] in ROTATED

        def fn(module, args):
            x = args[0].detach().float()
            if rotated:
                x = hadamard_rotate(x, hadamard_block(layer.in_features))
            a = x.abs().flatten()
            if clipped and percentile < 100:
                k = max(1, math.ceil(a.numel() * percentile / 100))
                stats[name].append(float(a.kthvalue(k).values))
            else:
                stats[name].append(float(a.max()) if a.numel() else 0.0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in targets]
    was_training = model.training
    model.eval()
    try:
        n = 0
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
            n += 1
        if n == 0:
            raise ValueError("calibrate: batches is empty")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, vals in stats.items():
        clipped = name.rpartition(".")[2] in CLIPPED
        c = sum(vals) / len(vals) if clipped and vals else max(vals, default=0.0)
        out[name] = c if c > 0 else 1.0
    return out


def quantize_w8a8(model: SequenceModel, batches: Iterable[dict[str, Tensor] | Tensor], percentile: float = 99.99
                  ) -> SequenceModel:
    """A W8A8 copy of ``model`` (float32), in eval mode, with static activation scales from :func:`calibrate`
    on ``batches`` (module docstring)."""
    check_float_model("quantize_w8a8", model)
    clip = calibrate(model, batches, percentile)
    q = copy.deepcopy(model).eval()
    targets = linear_targets(q)
    if not targets:
        raise ValueError("quantize_w8a8: the model has no nn.Linear layer to quantize")
    new = {}
    for name, linear in targets:
        if linear not in new:
            rotate = name.rpartition(".")[2] in ROTATED
            new[linear] = W8A8Linear.from_linear(linear, clip[name] / 127.0, rotate)
        replace_module(q, name, new[linear])
    q.requires_grad_(False)
    return enable_w8a8_step(q)

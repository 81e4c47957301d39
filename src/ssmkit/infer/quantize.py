"""Weight-only int8 models for fast decoding on CPU.

    from ssmkit.infer import generate, quantize_weights
    q = quantize_weights(model)                    # a new model; ``model`` is unchanged
    tokens = generate(q, input_ids, 256, temperature=0)

Every ``nn.Linear`` (in/out and x projections, MLPs, attention projections and the LM head, also when it is tied
to the embedding) becomes an :class:`Int8Linear`: int8 weights with one float32 scale per output
channel (:func:`ssmkit.ops.quantize_int8`), float32 activations and accumulation. Embeddings, norms, convolution
kernels, the SSM parameters (A, D) and Mamba's small ``dt_proj`` (whose weight and bias the layer uses apart) stay
float32. Decoding reads every weight once per token, so it
moves about a quarter of the bytes; outputs differ from the float32 model by the rounding of the weights (each at
most half a step of its row's scale), so greedy generations can part ways where two tokens are nearly tied. The
quantized model is for inference: it holds no trainable weights in its linear layers.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.heads import SequenceModel
from ..ops.int8_linear import dequantize_int8, int8_linear, quantize_int8

#: attribute names of linear layers left in float32 (their weights are used directly, not through forward)
KEEP_FLOAT = frozenset({"dt_proj"})


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (buffers ``qweight`` (out, in), ``scale`` (out,)) and an optional float32
    bias; ``forward(x)``: x (..., in) float32 -> (..., out)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"Int8Linear.from_linear: the layer's weight must be float32, got {linear.weight.dtype}")
        q, s = quantize_int8(linear.weight)
        return cls(q, s, linear.bias)

    def dequantized_weight(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_weights(model: SequenceModel) -> SequenceModel:
    """A copy of ``model`` (float32) whose ``nn.Linear`` layers are :class:`Int8Linear` (see the module
    docstring), in eval mode."""
    if not isinstance(model, SequenceModel):
        raise TypeError(f"quantize_weights: model must be an ssmkit SequenceModel, got {type(model).__name__}")
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"quantize_weights: the model must be float32, it holds {', '.join(bad)} parameters")
    q = copy.deepcopy(model).eval()
    targets = [(name, m) for name, m in q.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in KEEP_FLOAT]
    if not targets:
        raise ValueError("quantize_weights: the model has no nn.Linear layer to quantize")
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = q.get_submodule(parent_name) if parent_name else q
        setattr(parent, attr, Int8Linear.from_linear(linear))
    q.requires_grad_(False)
    return q

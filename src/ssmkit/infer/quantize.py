"""Weight-only int8 and int4 models for fast decoding on CPU.

    from ssmkit.infer import generate, quantize_weights
    q = quantize_weights(model)                    # a new model; ``model`` is unchanged
    q4 = quantize_weights(model, bits=4, group_size=32)
    tokens = generate(q, input_ids, 256, temperature=0)

Every ``nn.Linear`` (in/out and x projections, MLPs, attention projections and the LM head, also when it is tied
to the embedding) becomes an :class:`Int8Linear`: int8 weights with one float32 scale per output
channel (:func:`ssmkit.ops.quantize_int8`), float32 activations and accumulation. Embeddings, norms, convolution
kernels, the SSM parameters (A, D) and Mamba's small ``dt_proj`` (whose weight and bias the layer uses apart) stay
float32; so do, by default (``dt_rows="float"``), the Δ rows of a Mamba with ``dt_source="in_proj"`` (in_proj's
last d_inner rows, which take dt_proj's place): its in_proj becomes a :class:`RowSplitLinear` of quantized (x, z)
rows and float32 Δ rows. Those rows are a third of in_proj (d_inner x d_model, not dt_proj's rank x d_inner), so
in float32 they add 3 bytes per weight to every token's reads; ``dt_rows="quantized"`` quantizes them with the
rest.
Decoding reads every weight once per token, so it moves about a quarter of the bytes; outputs differ from the
float32 model by the rounding of the weights (each at most half a step of its row's scale), so greedy generations
can part ways where two tokens are nearly tied. The quantized model is for inference: it holds no trainable
weights in its linear layers.

With ``bits=4`` every such layer becomes an :class:`Int4Linear` instead: 4-bit weights, two per byte, with one
float32 scale per group of ``group_size`` inputs of a row (:func:`ssmkit.ops.int4_linear.quantize_int4`), about
an eighth of the float32 bytes (plus 4 bytes of scale per group). Every quantized layer's ``in_features`` must be a
multiple of ``group_size``.

``activations="int8"`` makes the quantized layers multiply integer activations, as llama.cpp's q8_0 and q4_0
products do: each layer's input is quantized per block of 32 values to int8 with one float scale per block
(:mod:`ssmkit.ops.q8_act`), the int8 x int8 (or int4 x int8) products are summed exactly in int32 per block,
and the fused decode kernels run these products with ``vpdpbusd`` (AVX-512 VNNI; ``vpmaddwd`` without it)
instead of widening every weight to float.
The input rounding adds an error of at most half a step of each block's scale; prefill and gradients use the
same quantized activations in torch ops, so prompt and decode agree. The layers' ``act_quant`` attribute holds
the setting (every quantized layer of a model must agree for the fused decode).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.heads import SequenceModel
from ..ops.int4_linear import GROUP_SIZES, dequantize_int4, int4_linear, quantize_int4
from ..ops.int8_linear import dequantize_int8, int8_linear, quantize_int8

#: attribute names of linear layers left in float32 (their weights are used directly, not through forward)
KEEP_FLOAT = frozenset({"dt_proj"})


def _check_act(where: str, act_quant: object) -> None:
    if not isinstance(act_quant, bool):
        raise ValueError(f"{where}: act_quant must be a bool, got {act_quant!r}")


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (buffers ``qweight`` (out, in), ``scale`` (out,)) and an optional float32
    bias; ``forward(x)``: x (..., in) float32 -> (..., out); ``act_quant``: x quantized per block of 32 first
    (module docstring)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, *, act_quant: bool = False
                 ) -> None:
        super().__init__()
        _check_act("Int8Linear", act_quant)
        self.act_quant = act_quant
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_quant: bool = False) -> Int8Linear:
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"Int8Linear.from_linear: the layer's weight must be float32, got {linear.weight.dtype}")
        q, s = quantize_int8(linear.weight)
        return cls(q, s, linear.bias, act_quant=act_quant)

    def dequantized_weight(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias, act_quant=self.act_quant)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8{', int8 activations' if self.act_quant else ''}")


class Int4Linear(nn.Module):
    """A linear layer with packed int4 weights (buffers ``qweight`` (out, in / 2) int8 bytes, ``scale``
    (out, in / group_size) float32) and an optional float32 bias; ``forward(x)``: x (..., in) float32 ->
    (..., out); ``act_quant``: x quantized per block of 32 first (module docstring)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, *, act_quant: bool = False
                 ) -> None:
        super().__init__()
        _check_act("Int4Linear", act_quant)
        self.act_quant = act_quant
        self.in_features, self.out_features = 2 * qweight.shape[1], qweight.shape[0]
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, *, act_quant: bool = False) -> Int4Linear:
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"Int4Linear.from_linear: the layer's weight must be float32, got {linear.weight.dtype}")
        q, s = quantize_int4(linear.weight, group_size)
        return cls(q, s, linear.bias, act_quant=act_quant)

    def dequantized_weight(self) -> Tensor:
        return dequantize_int4(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return int4_linear(x, self.qweight, self.scale, self.bias, act_quant=self.act_quant)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group_size={self.group_size}{', int8 activations' if self.act_quant else ''}")


class RowSplitLinear(nn.Module):
    """The rows of one linear layer in two parts: ``forward(x)`` = cat(quantized(x), kept(x)) along the last dim,
    x (..., in) -> (..., quantized.out_features + kept.out_features). For a Mamba with dt_source="in_proj":
    in_proj's (x, z) rows quantized, its Δ rows (the last d_inner) a float32 ``nn.Linear``, as the default
    block keeps dt_proj."""

    def __init__(self, quantized: nn.Module, kept: nn.Linear) -> None:
        super().__init__()
        if quantized.in_features != kept.in_features:
            raise ValueError(f"RowSplitLinear: both parts must take the same in_features, got "
                             f"{quantized.in_features} and {kept.in_features}")
        self.quantized, self.kept = quantized, kept
        self.in_features = kept.in_features
        self.out_features = quantized.out_features + kept.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, n_kept: int, quantize) -> RowSplitLinear:
        """Split ``linear``'s last ``n_kept`` rows (0 < n_kept < out_features) off as float32; ``quantize``:
        nn.Linear -> the quantized layer for the other rows."""
        n_q = linear.out_features - n_kept
        if not 0 < n_kept < linear.out_features:
            raise ValueError(f"RowSplitLinear.from_linear: n_kept must be in (0, {linear.out_features}), got {n_kept}")
        parts = []
        for lo, hi in ((0, n_q), (n_q, linear.out_features)):
            part = nn.Linear(linear.in_features, hi - lo, bias=linear.bias is not None,
                             dtype=linear.weight.dtype, device=linear.weight.device)
            with torch.no_grad():
                part.weight.copy_(linear.weight[lo:hi])
                if linear.bias is not None:
                    part.bias.copy_(linear.bias[lo:hi])
            parts.append(part)
        return cls(quantize(parts[0]), parts[1])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.quantized(x), self.kept(x)], dim=-1)


def float_rows(model: nn.Module) -> dict[str, int]:
    """{name of a linear layer: how many of its last rows stay float32}: the Δ rows of in_proj in every Mamba with
    dt_source="in_proj" (the default block's dt_proj stays float32 as a whole, :data:`KEEP_FLOAT`)."""
    from ..layers.mamba import Mamba

    return {f"{name}.in_proj" if name else "in_proj": m.d_inner for name, m in model.named_modules()
            if isinstance(m, Mamba) and getattr(m, "dt_source", "x_proj") == "in_proj"}


def linear_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every ``nn.Linear`` that quantization replaces (all but :data:`KEEP_FLOAT`)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in KEEP_FLOAT]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def check_float_model(where: str, model: object) -> None:
    if not isinstance(model, SequenceModel):
        raise TypeError(f"{where}: model must be an ssmkit SequenceModel, got {type(model).__name__}")
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"{where}: the model must be float32, it holds {', '.join(bad)} parameters")


#: what ``quantize_weights(activations=...)`` accepts
ACTIVATIONS = ("float", "int8")
#: what ``quantize_weights(dt_rows=...)`` accepts
DT_ROWS = ("float", "quantized")


def quantize_weights(model: SequenceModel, bits: int = 8, group_size: int = 32, *,
                     activations: str = "float", dt_rows: str = "float") -> SequenceModel:
    """A copy of ``model`` (float32) whose ``nn.Linear`` layers are :class:`Int8Linear` (``bits=8``) or
    :class:`Int4Linear` (``bits=4``, scales per ``group_size`` inputs; see the module docstring), in eval
    mode; ``activations="int8"``: they multiply activations quantized per block of 32 (module docstring);
    ``dt_rows``: the Δ rows of a Mamba with dt_source="in_proj" stay "float" (default) or are "quantized"."""
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"quantize_weights: bits must be 4 or 8, got {bits!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize_weights: activations must be one of {ACTIVATIONS}, got {activations!r}")
    act_quant = activations == "int8"
    if dt_rows not in DT_ROWS:
        raise ValueError(f"quantize_weights: dt_rows must be one of {DT_ROWS}, got {dt_rows!r}")
    if bits == 4 and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"quantize_weights: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    check_float_model("quantize_weights", model)
    q = copy.deepcopy(model).eval()
    targets = linear_targets(q)
    if not targets:
        raise ValueError("quantize_weights: the model has no nn.Linear layer to quantize")
    if bits == 4:
        bad = [f"{n} ({m.in_features})" for n, m in targets if m.in_features % group_size]
        if bad:
            raise ValueError(f"quantize_weights: with bits=4 every layer's in_features must be a multiple of "
                             f"group_size {group_size}; not: {', '.join(bad)}")
    def quantize(linear: nn.Linear) -> nn.Module:
        return (Int8Linear.from_linear(linear, act_quant=act_quant) if bits == 8
                else Int4Linear.from_linear(linear, group_size, act_quant=act_quant))

    kept = float_rows(q) if dt_rows == "float" else {}
    new = {}  # a tied LM head and embedding share one weight: quantize it once
    for name, linear in targets:
        if linear not in new:
            new[linear] = (RowSplitLinear.from_linear(linear, kept[name], quantize) if name in kept
                           else quantize(linear))
        replace_module(q, name, new[linear])
    q.requires_grad_(False)
    return q

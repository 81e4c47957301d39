"""Int8 SSM states between decode steps, with one scale per (row, head, channel).

    qstate = quantize_state(state)                       # ModelState -> QuantizedModelState
    logits, qstate = step_int8_state(model, token, qstate)

A decode server keeps one recurrent state per sequence; for Mamba that is (Di, N) float32 per layer, for Mamba-2
(H, P, N). Stored as int8, each vector over the state dimension N gets its own float32 scale (symmetric,
scale = max|h| / 127, q = round(h / scale)), so the SSM state takes about a quarter of the bytes plus the scales (a
130M-shaped Mamba: 2.36 MB -> 0.74 MB per sequence; with its float conv windows, 2.8 MB -> 1.18 MB). Each step
dequantizes, runs the model's ordinary (fused) step in float32 and quantizes the new state again, so the rounding
(at most half a step per entry) re-enters at every token.

Which tensors: the ``ssm`` fields of Mamba and Mamba-2 states (rank >= 3: (batch, ..., N)). Short conv windows,
the vector states of GatedSSM/RG-LRU/S4D (no state dimension to share a scale over) and attention KV caches stay
float.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ..layers.base import LayerState
from ..models.heads import SequenceModel
from ..models.outputs import ModelState

#: state fields stored as int8
QUANTIZED_FIELDS = frozenset({"ssm"})


class Int8State(NamedTuple):
    """q (..., N) int8 and scale (...) float32 with the tensor = q * scale[..., None]."""

    q: Tensor
    scale: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[..., None]

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def quantize_tensor(t: Tensor) -> Int8State:
    """t (..., N) float -> Int8State with one scale per vector over the last dim (1 for an all-zero vector)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim < 2:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"quantize_tensor: t must be a float tensor (..., N), got {got}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("quantize_tensor: t holds non-finite values")
    amax = t.detach().abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(t.detach().float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return Int8State(q, scale)


@dataclasses.dataclass
class QuantizedModelState:
    """A ModelState whose SSM tensors are :class:`Int8State`; ``dtype`` is what they dequantize to."""

    layers: list[LayerState]
    dtype: torch.dtype

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            for f in dataclasses.fields(layer):
                v = getattr(layer, f.name)
                total += v.nbytes() if isinstance(v, Int8State) else _float_nbytes(v)
        return total


def _float_nbytes(v: object) -> int:
    if isinstance(v, Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, LayerState):
        return sum(_float_nbytes(getattr(v, f.name)) for f in dataclasses.fields(v))
    return 0


def state_nbytes(state: ModelState) -> int:
    """Bytes of a float ModelState's tensors."""
    return sum(_float_nbytes(layer) for layer in state.layers)


def _quantizable(name: str, v: object) -> bool:
    return name in QUANTIZED_FIELDS and isinstance(v, Tensor) and v.ndim >= 3 and v.is_floating_point()


def quantize_state(state: ModelState) -> QuantizedModelState:
    """The SSM tensors of ``state`` as int8 with per-(row, head, channel) scales (module docstring)."""
    if not isinstance(state, ModelState):
        raise TypeError(f"quantize_state: state must be a ModelState, got {type(state).__name__}")
    layers, dtypes = [], set()
    for layer in state.layers:
        changes = {}
        for f in dataclasses.fields(layer):
            v = getattr(layer, f.name)
            if _quantizable(f.name, v):
                dtypes.add(v.dtype)
                changes[f.name] = quantize_tensor(v)
        layers.append(dataclasses.replace(layer, **changes) if changes else layer)
    if len(dtypes) > 1:
        raise ValueError(f"quantize_state: the SSM states have several dtypes {sorted(map(str, dtypes))}")
    return QuantizedModelState(layers, dtypes.pop() if dtypes else torch.float32)


def dequantize_state(qstate: QuantizedModelState) -> ModelState:
    """The float ModelState of ``qstate``."""
    if not isinstance(qstate, QuantizedModelState):
        raise TypeError(f"dequantize_state: qstate must be a QuantizedModelState, got {type(qstate).__name__}")
    layers = []
    for layer in qstate.layers:
        changes = {f.name: getattr(layer, f.name).dequantize(qstate.dtype) for f in dataclasses.fields(layer)
                   if isinstance(getattr(layer, f.name), Int8State)}
        layers.append(dataclasses.replace(layer, **changes) if changes else layer)
    return ModelState(layers)


def step_int8_state(model: SequenceModel, inputs_t: Tensor, qstate: QuantizedModelState
                    ) -> tuple[Tensor, QuantizedModelState]:
    """One decode step of ``model`` from an int8 state: (outputs of ``model.step``, the new int8 state)."""
    out, state = model.step(inputs_t, dequantize_state(qstate))
    return out, quantize_state(state)

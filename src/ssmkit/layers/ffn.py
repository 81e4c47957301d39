"""A position-wise feed-forward network as a sequence layer (a stateless "mixer"), for hybrid models whose
MLPs are blocks of their own (NemotronH) or sub-blocks with their own norm (Bamba, Jamba).

    gated:      down_proj(act(gate_proj(x)) * up_proj(x))
    not gated:  down_proj(act(up_proj(x)))

Parameter names follow transformers' Llama-style MLPs (gate_proj, up_proj, down_proj). The state is empty
(:class:`NoState`), so stepping, state passing and packing are trivially exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerState, SequenceLayer, check_choice, check_d_model, state_kwargs


@dataclass
class NoState(LayerState):
    """The (empty) state of a position-wise layer."""


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


#: activation name (transformers' ACT2FN spelling) -> function
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": _relu2,
}


def check_positive_int(owner: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
    return v


def check_bool(owner: str, name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(v).__name__}")
    return v


class MLPWeights(nn.Module):
    """The projections of one (gated or plain) MLP: x (..., d_model) -> (..., d_model)."""

    def __init__(self, d_model: int, d_hidden: int, act: str, gated: bool, bias: bool, gate_multiplier: float = 1.0,
                 down_multiplier: float = 1.0, **kw) -> None:
        super().__init__()
        self.act, self.gated = act, gated
        self.gate_multiplier, self.down_multiplier = gate_multiplier, down_multiplier
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias, **kw) if gated else None
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias, **kw)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.act]
        # without autograd the activation and gate write into the projections' fresh outputs
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or self.up_proj.weight.requires_grad))
        if self.gate_proj is None:
            h = self.up_proj(x)
            h = F.relu_(h).square_() if inplace and self.act == "relu2" else act(h)
        else:
            g = self.gate_proj(x)
            h = act(g if self.gate_multiplier == 1.0 else g * self.gate_multiplier)
            h = h.mul_(self.up_proj(x)) if inplace else h * self.up_proj(x)
        y = self.down_proj(h)
        return y if self.down_multiplier == 1.0 else y * self.down_multiplier


class PositionwiseLayer(SequenceLayer):
    """The sequence-layer contract for a layer that maps each position on its own (empty state): subclasses
    define ``mix(x (..., d_model)) -> (..., d_model)``; forward and step both call it."""

    def mix(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> NoState:
        check_positive_int(f"{type(self).__name__}.init_state", "batch_size", batch_size)
        return NoState()

    @state_kwargs
    def forward(self, x: Tensor, initial_state: NoState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, NoState()) with ``return_final_state``."""
        x = self.check_input(x)
        self.check_dtype(x)
        self.check_reset(reset, x)
        if initial_state is not None:
            self.check_state(initial_state, x.shape[0])
        y = self.mix(x)
        return (y, NoState()) if return_final_state else y

    def step(self, x_t: Tensor, state: NoState) -> tuple[Tensor, NoState]:
        """x_t: (batch, d_model) -> (y_t, NoState())."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        self.check_state(state, x_t.shape[0])
        return self.mix(x_t), NoState()


class FeedForward(PositionwiseLayer):
    """A position-wise MLP with the sequence-layer contract (empty state).

    Args:
        d_model: model width.
        d_hidden: hidden width (default 4 * d_model).
        act: one of :data:`ACTIVATIONS` ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2").
        gated: gate_proj present (SwiGLU-style) or not.
        bias: biases in the projections.
        gate_multiplier, down_multiplier: FalconH1's muP constants: act(gate_proj(x) * gate_multiplier) and
            down_proj(...) * down_multiplier (1.0 skips them).

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        act: str = "silu",
        gated: bool = True,
        *,
        bias: bool = False,
        gate_multiplier: float = 1.0,
        down_multiplier: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_hidden = check_positive_int(name, "d_hidden", 4 * d_model if d_hidden is None else d_hidden)
        self.act = check_choice(name, "act", act, tuple(ACTIVATIONS))
        self.gated = check_bool(name, "gated", gated)
        check_bool(name, "bias", bias)
        for k, v in (("gate_multiplier", gate_multiplier), ("down_multiplier", down_multiplier)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}: {k} must be a positive number, got {v!r}")
        if gate_multiplier != 1.0 and not gated:
            raise ValueError(f"{name}: gate_multiplier needs gated=True")
        self.mlp = MLPWeights(d_model, self.d_hidden, act, gated, bias, float(gate_multiplier), float(down_multiplier),
                              device=device, dtype=dtype)

    def mix(self, x: Tensor) -> Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return self.mlp(x)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, act={self.act!r}, gated={self.gated}"

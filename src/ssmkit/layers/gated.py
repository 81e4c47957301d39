"""Gated linear RNNs: the Birdie baseline gated SSM and Hawk's RG-LRU, both on the fused ``linear_scan``.

Both layers keep one real vector per sequence as their state, h: (batch, d_state), so ``step`` is O(1). With
``reverse=True`` the recurrence runs right to left (feed tokens to ``step`` from last to first; a state
passed to ``forward`` then enters at the last position), still honouring ``reset`` as segment starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.ops import linear_scan
from ssmkit.ops.linear_scan import compute_dtype

from .base import (
    LayerState,
    SequenceLayer,
    check_d_model,
    check_flag,
    cut_at_segment_start,
    state_kwargs,
    to_compute,
)


@dataclass
class GatedSSMState(LayerState):
    """h: (batch, d_state), in the compute dtype (float32 for 16-bit inputs)."""

    h: Tensor


@dataclass
class RGLRUState(LayerState):
    """h: (batch, d_state), in the compute dtype (float32 for 16-bit inputs)."""

    h: Tensor


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _unit_range(owner: str, name: str, value: object) -> tuple[float, float]:
    """A (low, high) pair with 0 < low <= high < 1."""
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    )
    if not ok or not 0.0 < value[0] <= value[1] < 1.0:
        raise ValueError(
            f"{owner}: {name} must be a pair (low, high) with 0 < low <= high < 1, got {value!r}"
        )
    return float(value[0]), float(value[1])


class _GatedBase(SequenceLayer):
    """Shared state handling: the state is one vector h per sequence."""

    state_cls: type[LayerState]
    d_state: int
    reverse: bool

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> LayerState:
        """Zero state h: (batch_size, d_state) in the compute dtype of ``dtype`` (default: the parameters)."""
        dt = compute_dtype(dtype or self.param_dtype)
        return self.state_cls(
            h=torch.zeros(batch_size, self.d_state, dtype=dt, device=self.param_device)
        )

    def _state_h(self, state: object, x: Tensor) -> Tensor:
        """Validate a state against this layer and the input ``x``; return its h tensor."""
        st = self.check_state(state, x.shape[0])
        want = compute_dtype(x.dtype)
        if st.h.dtype != want:
            raise TypeError(
                f"{type(self).__name__}: state.h must have dtype {want} for {x.dtype} inputs, "
                f"got {st.h.dtype}"
            )
        return st.h

    def _prepare(
        self, x: object, state: object, reset: object
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        h0 = None if state is None else self._state_h(state, x)
        return x, h0, reset

    def _coeffs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (..., d_model) -> (decay a, input b, output gate or None), each (..., d_state)."""
        raise NotImplementedError

    def _out(self, h: Tensor, gate: Tensor | None) -> Tensor:
        """Hidden states h (..., d_state) and the output gate -> y (..., d_model)."""
        raise NotImplementedError

    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: LayerState | None = None,
        *,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model), or (y, final state) if
        ``return_final_state``."""
        x, h0, reset = self._prepare(x, initial_state, reset)
        a, b, gate = self._coeffs(x)
        h, h_last = linear_scan(
            a, b, initial_state=h0, reset=reset, reverse=self.reverse, return_final_state=True
        )
        y = self._out(h, gate)
        if not return_final_state:
            return y
        state = self.state_cls(h=h_last)
        return y, (cut_at_segment_start(state, reset) if self.reverse else state)

    def step(self, x_t: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token x_t: (batch, d_model) -> (y_t (batch, d_model), new state); O(1) in the length."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        h = self._state_h(state, x_t)
        a, b, gate = self._coeffs(x_t)
        h = a.to(h.dtype) * h + b.to(h.dtype)
        return self._out(h.to(x_t.dtype), gate), self.state_cls(h=h)


    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, reverse={self.reverse}"


class GatedSSM(_GatedBase):
    """Gated linear recurrence (the Birdie paper's baseline, Hawk-style).

    i = σ(W_i x), z = W_z x, o = GeLU(W_o x), f = σ(W_f x);
    h_t = f_t ⊙ h_{t-1} + i_t ⊙ z_t;  y = W_out(o ⊙ h).

    The four input projections are one fused Linear (d_model -> 4 d_state, order i, z, o, f).

    Init: PyTorch's default Linear init, except the forget-gate bias, set to logit(u) with u drawn uniformly
    in ``f_init`` (default [0.9, 0.99]) per channel, so that at init f starts near 0.9-0.99 (memory spans of
    about 10-100 tokens) rather than 0.5.

    Args:
        d_model: model width.
        d_state: width of the recurrence (the state size); default d_model.
        reverse: run right to left.
        f_init: (low, high) range of the initial forget gate.

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model); state h (batch, d_state).
    """

    state_cls = GatedSSMState

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        reverse: bool = False,
        *,
        f_init: tuple[float, float] = (0.9, 0.99),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_state = d_model if d_state is None else _positive_int(name, "d_state", d_state)
        self.reverse = check_flag(name, "reverse", reverse)
        lo, hi = _unit_range(name, "f_init", f_init)
        kw = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(self.d_model, 4 * self.d_state, **kw)
        self.out_proj = nn.Linear(self.d_state, self.d_model, **kw)
        with torch.no_grad():
            u = torch.empty(self.d_state, dtype=torch.float64).uniform_(lo, hi)
            self.in_proj.bias[3 * self.d_state :].copy_(torch.log(u / (1 - u)))

    def _coeffs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d_model) -> decay f, input i ⊙ z and output gate GeLU(o), each (..., d_state)."""
        i, z, o, f = to_compute(self, *self.in_proj(x).chunk(4, dim=-1))  # float32 under autocast
        return torch.sigmoid(f), torch.sigmoid(i) * z, F.gelu(o)

    _gates = _coeffs  # the name ssmkit.export.onnx_step reads

    def _out(self, h: Tensor, o: Tensor) -> Tensor:
        return self.out_proj(o * h)


class RGLRU(_GatedBase):
    """Hawk's recurrent block around the RG-LRU (Griffin's recurrent block without its short conv).

    Block: u = W_u x (the input branch x̃), g = GeLU(W_g x) (the gate branch, if ``gate``); y = W_out(g ⊙ h).
    RG-LRU on u:
        r_t = σ(W_a u_t + b_a),  i_t = σ(W_x u_t + b_x),  log a_t = -c · r_t · softplus(Λ),
        h_t = a_t ⊙ h_{t-1} + √(1 - a_t²) ⊙ (i_t ⊙ u_t),
    with √(1 - a²) computed as √(-expm1(2 log a)), accurate when a is near 1.

    Choices: no short conv (so the state is exactly h); the gate weights W_a, W_x are dense (Griffin uses
    block-diagonal ones); the input normalisation √(1 - a²) also applies at segment starts (Griffin skips it
    there), which keeps ``step`` free of position bookkeeping.

    Init: Λ so that a^c = exp(-c softplus(Λ)) (the decay at r = 1) is uniform in ``a_init`` (default
    [0.9, 0.999]); PyTorch's default Linear init elsewhere.

    Args:
        d_model: model width.
        d_state: width of the recurrence (Griffin's lru_width); default d_model.
        c: the fixed scale of the decay exponent (8 in Hawk).
        reverse: run right to left.
        gate: use the GeLU gate branch.
        a_init: (low, high) range of the initial decay a^c.
        bias: biases in the input and output projections (the gate projection always has b_a, b_x).

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model); state h (batch, d_state).
    """

    state_cls = RGLRUState

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        c: float = 8.0,
        reverse: bool = False,
        *,
        gate: bool = True,
        a_init: tuple[float, float] = (0.9, 0.999),
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_state = d_model if d_state is None else _positive_int(name, "d_state", d_state)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
            raise ValueError(f"{name}: c must be a positive finite number, got {c!r}")
        self.c = float(c)
        self.reverse = check_flag(name, "reverse", reverse)
        self.gate = check_flag(name, "gate", gate)
        bias = check_flag(name, "bias", bias)
        lo, hi = _unit_range(name, "a_init", a_init)
        kw = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(self.d_model, (2 if self.gate else 1) * self.d_state, bias=bias, **kw)
        self.gate_proj = nn.Linear(self.d_state, 2 * self.d_state, **kw)
        self.lam = nn.Parameter(torch.empty(self.d_state, **kw))
        self.out_proj = nn.Linear(self.d_state, self.d_model, bias=bias, **kw)
        with torch.no_grad():
            a_c = torch.empty(self.d_state, dtype=torch.float64).uniform_(lo, hi)
            sp = -torch.log(a_c) / self.c  # softplus(Λ) = -log(a^c) / c
            self.lam.copy_(torch.log(torch.expm1(sp)))  # inverse softplus

    def _coeffs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (..., d_model) -> decay a, input √(1-a²) i u and gate branch (or None), each (..., d_state)."""
        proj = to_compute(self, self.in_proj(x))  # float32 under autocast
        u, g = proj.chunk(2, dim=-1) if self.gate else (proj, None)
        r, i = torch.sigmoid(to_compute(self, self.gate_proj(u))).chunk(2, dim=-1)
        log_a = -self.c * r * F.softplus(self.lam)
        mult = torch.sqrt(-torch.expm1(2 * log_a))
        return torch.exp(log_a), mult * (i * u), None if g is None else F.gelu(g)

    def _out(self, h: Tensor, g: Tensor | None) -> Tensor:
        return self.out_proj(h if g is None else g * h)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.c}, gate={self.gate}"

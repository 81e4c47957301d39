"""Griffin's recurrent block (RecurrentGemma): a GeLU gate branch times a short causal conv followed by the RG-LRU
with block-diagonal gates.

    y_branch = act(linear_y(x))
    u = conv_1d(linear_x(x))                                   (depthwise, causal, width conv_width, with bias)
    r_t = σ(u_t W_a + b_a),  i_t = σ(u_t W_x + b_x)            (W_a, W_x block-diagonal: n_heads blocks)
    log a_t = -c · r_t · softplus(Λ)
    h_t = a_t ⊙ h_{t-1} + √(1 - a_t²) ⊙ (i_t ⊙ u_t),           except at a segment start (position 0):
    h_t = i_t ⊙ u_t                                            (no decay, no √(1 - a²) normalisation)
    out = linear_out(h ⊙ y_branch)

This differs from :class:`~ssmkit.layers.gated.RGLRU` (Hawk's block without the conv, dense gates, normalised at
segment starts), whose semantics stay as they are. Parameter names follow transformers'
``RecurrentGemmaRecurrentBlock`` (linear_x, linear_y, linear_out, conv_1d, rg_lru.*). √(1 - a²) is computed as
√(-expm1(2 log a)), accurate when a is near 1 (transformers computes 1 - exp(2 log a)).

State (:class:`GriffinState`): the conv's last conv_width - 1 inputs, h, and the position in the current segment
(the conv sees no input from an earlier segment; position 0 is a segment start). A fresh ``init_state`` is a
segment start, so stepping from it equals a forward over a fresh sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import linear_scan
from ..ops.linear_scan import compute_dtype
from .attention import segments_and_positions
from .base import LayerState, SequenceLayer, check_choice, check_d_model, state_kwargs, to_compute
from .ffn import ACTIVATIONS, check_positive_int
from .gated import _unit_range


@dataclass
class GriffinState(LayerState):
    """conv: (batch, conv_width - 1, lru_width) the conv's last inputs, oldest first (the activations' dtype);
    h: (batch, lru_width) the RG-LRU state (compute dtype: float32 for 16-bit inputs); pos: (batch,) int64 tokens
    of the current segment so far."""

    conv: Tensor
    h: Tensor
    pos: Tensor


def _sqrt_one_minus_a2(log_a: Tensor) -> Tensor:
    """√(1 - a²) from log a, accurate near a = 1; its argument is kept >= the dtype's smallest normal, so that a = 1
    exactly (log a = 0, e.g. at a segment start whose normalisation is then discarded) gives a finite gradient."""
    return torch.sqrt((-torch.expm1(2 * log_a)).clamp_min(torch.finfo(log_a.dtype).tiny))


class RGLRUGates(nn.Module):
    """The RG-LRU's parameters: Λ (``recurrent_param``, (lru_width,)) and the block-diagonal input / recurrence
    gates (``*_gate_weight`` (n_heads, block, block), ``*_gate_bias`` (n_heads, block))."""

    def __init__(self, width: int, n_heads: int, c: float, a_init: tuple[float, float], **kw) -> None:
        super().__init__()
        block = width // n_heads
        self.recurrent_param = nn.Parameter(torch.empty(width, **kw))
        self.input_gate_weight = nn.Parameter(torch.empty(n_heads, block, block, **kw))
        self.input_gate_bias = nn.Parameter(torch.zeros(n_heads, block, **kw))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(n_heads, block, block, **kw))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(n_heads, block, **kw))
        with torch.no_grad():
            bound = block ** -0.5
            self.input_gate_weight.uniform_(-bound, bound)
            self.recurrent_gate_weight.uniform_(-bound, bound)
            a_c = torch.empty(width, dtype=torch.float64).uniform_(*a_init)  # the decay a^c at r = 1
            self.recurrent_param.copy_(torch.log(torch.expm1(-torch.log(a_c) / c)))  # softplus(Λ) = -log(a^c) / c

    def gates(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u (..., lru_width) -> (input gate i, recurrence gate r), each (..., lru_width)."""
        n, b = self.input_gate_bias.shape
        uh = u.reshape(-1, n, b).transpose(0, 1)  # (n_heads, positions, block): one matmul per block
        i = torch.baddbmm(self.input_gate_bias[:, None], uh, self.input_gate_weight)
        r = torch.baddbmm(self.recurrent_gate_bias[:, None], uh, self.recurrent_gate_weight)
        return (torch.sigmoid(i).transpose(0, 1).reshape(u.shape), torch.sigmoid(r).transpose(0, 1).reshape(u.shape))


class GriffinRecurrent(SequenceLayer):
    """Griffin's recurrent block (see the module docstring).

    Args:
        d_model: model width.
        lru_width: width of the conv and the RG-LRU (default d_model).
        n_heads: number of diagonal blocks of the gate weights (divides lru_width).
        conv_width: the causal conv's kernel size.
        act: the gate branch's activation, one of :data:`~ssmkit.layers.ffn.ACTIVATIONS`.
        c: the fixed scale of the decay exponent (8 in Griffin).
        a_init: (low, high) range of the initial decay a^c (at r = 1).

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model); state :class:`GriffinState`.
    """

    def __init__(
        self,
        d_model: int,
        lru_width: int | None = None,
        n_heads: int = 1,
        conv_width: int = 4,
        act: str = "gelu_pytorch_tanh",
        c: float = 8.0,
        *,
        a_init: tuple[float, float] = (0.9, 0.999),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.lru_width = check_positive_int(name, "lru_width", d_model if lru_width is None else lru_width)
        self.n_heads = check_positive_int(name, "n_heads", n_heads)
        if self.lru_width % self.n_heads:
            raise ValueError(f"{name}: n_heads={n_heads} must divide lru_width={self.lru_width}")
        self.conv_width = check_positive_int(name, "conv_width", conv_width)
        self.act = check_choice(name, "act", act, tuple(ACTIVATIONS))
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
            raise ValueError(f"{name}: c must be a positive finite number, got {c!r}")
        self.c = float(c)
        a_init = _unit_range(name, "a_init", a_init)
        kw = {"device": device, "dtype": dtype}
        w = self.lru_width
        self.linear_y = nn.Linear(d_model, w, **kw)
        self.linear_x = nn.Linear(d_model, w, **kw)
        self.conv_1d = nn.Conv1d(w, w, self.conv_width, groups=w, **kw)
        self.rg_lru = RGLRUGates(w, self.n_heads, self.c, a_init, **kw)
        self.linear_out = nn.Linear(w, d_model, **kw)

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> GriffinState:
        """A segment start: zero conv inputs and h, position 0."""
        check_positive_int(f"{type(self).__name__}.init_state", "batch_size", batch_size)
        dt, dev = dtype or self.param_dtype, self.param_device
        return GriffinState(conv=torch.zeros(batch_size, self.conv_width - 1, self.lru_width, dtype=dt, device=dev),
                            h=torch.zeros(batch_size, self.lru_width, dtype=compute_dtype(dt), device=dev),
                            pos=torch.zeros(batch_size, dtype=torch.long, device=dev))

    def _check(self, st: object, batch: int, dtype: torch.dtype, check_pos: bool = True) -> GriffinState:
        """A GriffinState for ``batch`` rows of ``dtype`` inputs (checked field by field, cheaply: every step
        calls this)."""
        name = type(self).__name__
        if type(st) is not GriffinState:
            raise TypeError(f"{name}: state must be a GriffinState (from {name}.init_state or a {name} forward), got "
                            f"{type(st).__name__}")
        w = self.lru_width
        for field, shape, want in (("conv", (batch, self.conv_width - 1, w), dtype),
                                   ("h", (batch, w), compute_dtype(dtype)), ("pos", (batch,), torch.long)):
            t = getattr(st, field)
            if t.shape != shape:
                raise ValueError(f"{name}: state.{field} must have shape {shape}, got {tuple(t.shape)}; was this state "
                                 f"made by another layer or batch size?")
            if t.dtype != want:
                raise TypeError(f"{name}: state.{field} must have dtype {want} for {dtype} inputs, got {t.dtype}")
        if check_pos and bool((st.pos < 0).any()):
            raise ValueError(f"{name}: state.pos must be non-negative")
        return st

    # ------------------------------------------------------------------------------------------ forward
    def _conv(self, u: Tensor, prev: Tensor, pos: Tensor | None) -> Tensor:
        """Depthwise causal conv of u (batch, length, width) after ``prev`` (batch, conv_width - 1, width);
        the input at lag k counts only when pos (batch, length) >= k (same segment). pos None: every lag counts
        (prev is then zeros or entirely of the current segment)."""
        k_max, length = self.conv_width - 1, u.shape[1]
        full = torch.cat([prev, u], 1)
        w = self.conv_1d.weight[:, 0, :]  # (width, conv_width): column conv_width - 1 - k weighs lag k
        out = self.conv_1d.bias + full[:, k_max:] * w[:, k_max]
        for k in range(1, k_max + 1):
            tap = full[:, k_max - k:k_max - k + length] * w[:, k_max - k]
            if pos is not None:
                tap = torch.where((pos >= k)[..., None], tap, torch.zeros((), dtype=tap.dtype, device=tap.device))
            out = out + tap
        return out

    @state_kwargs
    def forward(self, x: Tensor, initial_state: GriffinState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, GriffinState) with ``return_final_state``.

        initial_state: a state to continue from; reset: (batch, length) bool segment starts."""
        x = self.check_input(x)
        self.check_dtype(x)
        reset = self.check_reset(reset, x)
        batch, length, _ = x.shape
        y_branch, u = to_compute(self, ACTIVATIONS[self.act](self.linear_y(x)), self.linear_x(x))
        st = self.init_state(batch, dtype=u.dtype) if initial_state is None else self._check(initial_state, batch,
                                                                                             u.dtype)
        _, pos = segments_and_positions(batch, length, reset, st, x.device)
        # the conv needs masks only at a reset or within conv_width - 1 of a state's segment start
        plain = reset is None and (initial_state is None or int(st.pos.min()) >= self.conv_width - 1)
        u_conv = self._conv(u, st.conv, None if plain else pos)
        i, r = self.rg_lru.gates(u_conv)
        log_a = -self.c * r * F.softplus(self.rg_lru.recurrent_param)
        start = (pos == 0)[..., None]
        a = torch.where(start, torch.zeros_like(log_a), torch.exp(log_a))
        norm = torch.where(start, torch.ones_like(log_a), _sqrt_one_minus_a2(log_a))
        b = u_conv * i * norm
        if length == 1:  # one decoding step: the recurrence itself, without the scan kernel's launch
            h_last = a[:, 0].to(st.h.dtype) * st.h + b[:, 0].to(st.h.dtype)
            h = h_last.to(b.dtype)[:, None]
        else:
            h, h_last = linear_scan(a, b, initial_state=st.h, return_final_state=True)
        y = self.linear_out(h * y_branch)
        if not return_final_state:
            return y
        conv = torch.cat([st.conv, u], 1)[:, length:]
        return y, GriffinState(conv=conv, h=h_last, pos=pos[:, -1] + 1)

    def step(self, x_t: Tensor, state: GriffinState) -> tuple[Tensor, GriffinState]:
        """One token x_t: (batch, d_model) -> (y_t (batch, d_model), new state); the forward's arithmetic with fewer
        small ops (no segment bookkeeping, conv masking only while a row is within conv_width - 1 of its start)."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        y_branch, u = to_compute(self, ACTIVATIONS[self.act](self.linear_y(x_t)), self.linear_x(x_t))
        st = self._check(state, x_t.shape[0], u.dtype, check_pos=False)
        window = torch.cat([st.conv, u[:, None]], 1)  # (batch, conv_width, width), oldest first
        new_conv = window[:, 1:]
        k_max, first = self.conv_width - 1, int(st.pos.min())  # one sync decides both special cases below
        if first < 0:
            raise ValueError(f"{type(self).__name__}: state.pos must be non-negative")
        if first < k_max:  # row j holds lag k_max - j: only lags <= pos count
            lag = torch.arange(k_max, -1, -1, device=x_t.device)
            window = torch.where((st.pos[:, None] >= lag)[..., None], window, torch.zeros((), dtype=window.dtype))
        u_conv = (window * self.conv_1d.weight[:, 0, :].t()).sum(1) + self.conv_1d.bias
        i, r = self.rg_lru.gates(u_conv)
        log_a = -self.c * r * F.softplus(self.rg_lru.recurrent_param)
        a, norm = torch.exp(log_a), _sqrt_one_minus_a2(log_a)
        if first == 0:  # some row starts its segment: no decay, no normalisation there
            start = (st.pos == 0)[:, None]
            a = torch.where(start, torch.zeros((), dtype=a.dtype), a)
            norm = torch.where(start, torch.ones((), dtype=norm.dtype), norm)
        h = a.to(st.h.dtype) * st.h + (u_conv * i * norm).to(st.h.dtype)
        y = self.linear_out(h.to(u.dtype) * y_branch)
        return y, GriffinState(conv=new_conv, h=h, pos=st.pos + 1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, lru_width={self.lru_width}, n_heads={self.n_heads}, "
                f"conv_width={self.conv_width}, act={self.act!r}, c={self.c}")

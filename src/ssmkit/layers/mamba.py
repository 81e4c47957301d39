"""Mamba (S6) block: in_proj -> short causal conv + SiLU -> selective scan gated by SiLU(z) -> out_proj.

Parameter names, shapes and initialisation follow transformers' ``MambaMixer`` (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj), so weights map one to one (see :mod:`ssmkit.interop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan
from ..ops.mamba_step import MambaStepWeights, mamba_step
from .base import (
    LayerState,
    SequenceLayer,
    check_d_model,
    check_state_dtypes,
    cut_at_segment_start,
    flip_reset,
    linear_weights,
    state_kwargs,
    to_compute,
)
from .short_conv import ShortConv


@dataclass
class MambaState(LayerState):
    """conv: (batch, d_inner, d_conv - 1), the last conv inputs; ssm: (batch, d_inner, d_state)."""

    conv: Tensor
    ssm: Tensor


def _positive_int(owner: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
    return v


def inner_size(owner: str, d_model: int, expand: object) -> int:
    """d_inner = expand * d_model, which must be a positive integer (no silent rounding)."""
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0:
        raise ValueError(f"{owner}: expand must be a positive number, got {expand!r}")
    d_inner = expand * d_model
    if d_inner != int(d_inner) or int(d_inner) < 1:
        raise ValueError(f"{owner}: expand * d_model must be a positive integer, "
                         f"got {expand} * {d_model} = {d_inner}")
    return int(d_inner)


def check_dt_range(owner: str, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    if not (0 < dt_min <= dt_max):
        raise ValueError(f"{owner}: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
    if not dt_init_floor >= 0:
        raise ValueError(f"{owner}: dt_init_floor must be >= 0, got {dt_init_floor!r}")


def init_dt_bias(bias: Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """In place: dt ~ log-uniform in [dt_min, dt_max] (clamped below at the floor); bias = softplus^-1(dt)."""
    with torch.no_grad():
        u = torch.rand(bias.shape, dtype=torch.float32, device=bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states accumulate in float32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class ConvScanBlock(SequenceLayer):
    """The frame Mamba and Mamba2 share: input, reset and state checks, the time flip of ``reverse=True`` and the
    returned state (cut at segment starts when reversed). Subclasses set ``state_cls`` (fields ``conv``, ``ssm``)
    and ``reverse`` and implement ``_mix(x, state, reset) -> (y, conv state, ssm state)`` left to right."""

    state_cls: ClassVar[type[LayerState]]
    reverse: bool

    def _mix(self, x: Tensor, state: LayerState | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _check_state(self, state: object, x: Tensor) -> LayerState:
        self.check_state(state, x.shape[0])
        check_state_dtypes(type(self).__name__, state, self.expected_state(x.shape[0], self.act_dtype(x)))
        return state

    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: LayerState | None = None,
        *,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model), or (y, final state) with
        ``return_final_state``.

        ``reset`` (bool (batch, length)) marks segment starts. With ``reverse=True`` the state passed in is
        the context to the right of x and the returned state is the one after processing x right to left
        (zero for rows where x starts a segment, so nothing flows into the chunk before it).
        """
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        if initial_state is not None:
            self._check_state(initial_state, x)
        reset_in = reset
        if self.reverse:  # all other maps are per token: flipping in and out makes the block right-to-left
            x, reset = x.flip(1), flip_reset(reset)
        y, conv_state, ssm_state = self._mix(x, initial_state, reset)
        if self.reverse:
            y = y.flip(1)
        if not return_final_state:
            return y
        new_state = self.state_cls(conv=conv_state, ssm=ssm_state.contiguous())
        return y, (cut_at_segment_start(new_state, reset_in) if self.reverse else new_state)


class Mamba(ConvScanBlock):
    """Mamba's selective SSM block.

    Args:
        d_model: model width.
        d_state: N, the state size per channel.
        d_conv: width of the causal depthwise conv.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the Δ projection; "auto" = ceil(d_model / 16).
        dt_min, dt_max, dt_init_floor: Δ bias init (log-uniform, inverse softplus).
        dt_scale: dt_proj weights are uniform in ±dt_scale / sqrt(dt_rank).
        conv_bias: bias in the conv; bias: biases in in_proj and out_proj.
        reverse: run right to left (anti-causal conv, reversed scan), honouring segment starts.
        out_norm: opt-in (Mamba-2's choice): y = out_proj(RMSNorm(y * silu(z))) with a learned weight
            (``norm.weight``, d_inner) instead of out_proj(y * silu(z)).
        dt_source: "x_proj" (default, Mamba's low-rank Δ from the post-conv activations through dt_proj) or
            "in_proj" (opt-in, Mamba-2's choice: Δ per channel from the block input by d_inner extra in_proj
            rows, plus ``dt_bias``; no dt_proj, and x_proj gives only B, C).

    The two opt-in choices change the parameters; the default block keeps transformers' MambaMixer layout, and
    the fused decode, export and interop paths take only the default block (``variant`` is False).

    forward: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    state_cls = MambaState

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int | float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        reverse: bool = False,
        out_norm: bool = False,
        dt_source: str = "x_proj",
    ) -> None:
        super().__init__()
        self.d_model = check_d_model("Mamba", d_model)
        self.d_state = _positive_int("Mamba", "d_state", d_state)
        self.d_conv = _positive_int("Mamba", "d_conv", d_conv)
        self.d_inner = inner_size("Mamba", d_model, expand)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"Mamba: unknown dt_rank {dt_rank!r}; expected 'auto' or a positive int")
        self.dt_rank = _positive_int("Mamba", "dt_rank", dt_rank)
        check_dt_range("Mamba", dt_min, dt_max, dt_init_floor)
        if not isinstance(reverse, bool):
            raise TypeError(f"Mamba: reverse must be a bool, got {type(reverse).__name__}")
        self.reverse = reverse
        if not isinstance(out_norm, bool):
            raise TypeError(f"Mamba: out_norm must be a bool, got {type(out_norm).__name__}")
        if dt_source not in ("x_proj", "in_proj"):
            raise ValueError(f"Mamba: dt_source must be 'x_proj' or 'in_proj', got {dt_source!r}")
        self.out_norm, self.dt_source = out_norm, dt_source
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale

        d_inner, N = self.d_inner, self.d_state
        dt_in = dt_source == "in_proj"
        self.in_proj = nn.Linear(d_model, (3 if dt_in else 2) * d_inner, bias=bias)
        self.conv1d = ShortConv(d_inner, d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, (0 if dt_in else self.dt_rank) + 2 * N, bias=False)
        if dt_in:
            self.dt_bias = nn.Parameter(torch.empty(d_inner))
        else:
            self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, N))
        self.D = nn.Parameter(torch.empty(d_inner))
        if out_norm:
            from .mamba2 import GatedRMSNorm  # mamba2 imports this module

            self.norm = GatedRMSNorm(d_inner, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A_log = log(1..N) per channel, D = 1, dt_proj weight uniform ±dt_scale/sqrt(rank),
        dt_proj bias = softplus^-1(dt)."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(A).expand_as(self.A_log))
        self.D.fill_(1.0)
        if self.dt_source == "in_proj":
            init_dt_bias(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)
            return
        std = self.dt_scale * self.dt_rank ** -0.5
        self.dt_proj.weight.uniform_(-std, std)
        init_dt_bias(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)

    @property
    def variant(self) -> bool:
        """True when an opt-in block choice (out_norm, dt_source='in_proj') is on: not transformers' MambaMixer."""
        return self.out_norm or self.dt_source != "x_proj"

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> MambaState:
        """Zero state: conv (batch, d_inner, d_conv - 1) in ``dtype``, ssm (batch, d_inner, d_state) in its
        accumulation dtype (float32 for 16-bit)."""
        _positive_int("Mamba.init_state", "batch_size", batch_size)
        dtype = dtype or self.A_log.dtype
        dev = self.A_log.device
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, dtype=dtype, device=dev),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, dtype=state_dtype(dtype), device=dev),
        )

    # ---------------------------------------------------------------------------------------- forward
    def _mix(self, x: Tensor, state: MambaState | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Left-to-right x (batch, length, d_model) -> (y, conv state, ssm state)."""
        di, N = self.d_inner, self.d_state
        dt_in = self.dt_source == "in_proj"  # opt-in: Δ per channel from in_proj's extra d_inner rows
        # under autocast the projections run in its dtype and to_compute brings their outputs back to float32
        xi, z, *dt_raw = to_compute(self, *self.in_proj(x).split([di] * (3 if dt_in else 2), dim=-1))
        u, conv_state = self.conv1d(xi, None if state is None else state.conv, reset=reset, activation="silu")
        if dt_in:
            B, C = to_compute(self, *self.x_proj(u).split([N, N], dim=-1))
            delta, delta_bias = dt_raw[0], self.dt_bias
        else:
            dt_r, B, C = to_compute(self, *self.x_proj(u).split([self.dt_rank, N, N], dim=-1))
            delta, delta_bias = to_compute(self, F.linear(dt_r, self.dt_proj.weight)), self.dt_proj.bias
        A = -torch.exp(self.A_log)
        y, ssm_state = selective_scan(
            u, delta, A, B, C, self.D, None if self.out_norm else z, delta_bias=delta_bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm, reset=reset, return_final_state=True,
        )
        if self.out_norm:  # opt-in: Mamba-2's gated RMSNorm, y = norm(y * silu(z))
            y = self.norm(y, z)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One token, O(1): x_t (batch, d_model) -> (y_t (batch, d_model), new state).

        With ``reverse=True`` feed tokens from last to first.
        """
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        self._check_state(state, x_t)
        if self.variant:  # the step kernel covers the default block only: one token through the forward's maps
            y, conv, ssm = self._mix(x_t[:, None], state, None)
            return y[:, 0], MambaState(conv=conv, ssm=ssm.contiguous())
        y, conv, ssm = mamba_step(x_t, self.step_weights(), state.conv, state.ssm, owner=self)
        return y, MambaState(conv=conv, ssm=ssm)

    def step_weights(self) -> MambaStepWeights:
        """The parameters as :func:`ssmkit.ops.mamba_step` takes them (linear layers may be int8 weight-only)."""
        if self.variant:
            raise ValueError(f"Mamba.step_weights: the step kernels take only the default block, got "
                             f"out_norm={self.out_norm}, dt_source={self.dt_source!r}")
        in_w, in_s, in_b = linear_weights(self.in_proj)
        x_w, x_s, x_b = linear_weights(self.x_proj)
        out_w, out_s, out_b = linear_weights(self.out_proj)
        if x_b is not None:
            raise ValueError("Mamba.step: x_proj must have no bias")
        return MambaStepWeights(
            in_w=in_w, in_b=in_b, conv_w=self.conv1d.weight[:, 0], conv_b=self.conv1d.bias, x_w=x_w,
            dt_w=self.dt_proj.weight, dt_b=self.dt_proj.bias, a_log=self.A_log, d=self.D, out_w=out_w, out_b=out_b,
            in_scale=in_s, x_scale=x_s, out_scale=out_s)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, reverse={self.reverse}"
                + (f", out_norm={self.out_norm}, dt_source={self.dt_source!r}" if self.variant else ""))

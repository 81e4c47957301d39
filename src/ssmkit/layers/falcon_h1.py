"""FalconH1's parallel hybrid mixer: a Mamba-2 and a GQA attention read the same normed input, and their outputs
are summed, each with its muP multiplier:

    y = ssm_out_multiplier * mamba(x) + attn_out_multiplier * attn(attn_in_multiplier * x)

The Mamba-2 (:class:`H1Mamba2`) scales its input by ``ssm_in_multiplier`` and the five parts of its in_proj output
(z, x, B, C, dt) by ``ssm_multipliers``; its output gate is silu(z) alone, or a grouped RMSNorm applied before
(``norm_before_gate``) or after the gate. Parameter names follow transformers (``mamba.*``, ``self_attn.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionState
from .base import LayerState, SequenceLayer, check_d_model, state_kwargs
from .ffn import check_bool
from .gqa import GQAttention
from .mamba2 import Mamba2, Mamba2State


def _number(owner: str, name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float("-inf") < v < float("inf"):
        raise ValueError(f"{owner}: {name} must be a finite number, got {v!r}")
    return float(v)


class MupLinear(nn.Linear):
    """nn.Linear on ``in_multiplier * x`` whose output columns are scaled by the buffer ``mup`` (out,)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, in_multiplier: float, mup: Tensor) -> None:
        super().__init__(d_in, d_out, bias=bias)
        self.in_multiplier = in_multiplier
        self.register_buffer("mup", mup, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.in_multiplier, self.weight, self.bias) * self.mup.to(x.dtype)


class H1GateNorm(nn.Module):
    """The output gate of :class:`H1Mamba2`: y * silu(z) (``rms_norm=False``), or a grouped RMSNorm with weight,
    applied to y before the gate (``norm_before_gate``) or to y * silu(z). Computes in (at least) float32."""

    def __init__(self, dim: int, groups: int, eps: float, rms_norm: bool, norm_before_gate: bool) -> None:
        super().__init__()
        self.dim, self.groups, self.eps, self.before = dim, groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim)) if rms_norm else None

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        if self.weight is None:
            return y * F.silu(z)
        acc = torch.promote_types(y.dtype, torch.float32)
        g = F.silu(z.to(acc))
        h = y.to(acc) if self.before else y.to(acc) * g
        h = h.unflatten(-1, (self.groups, self.dim // self.groups))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(acc)
        return (h * g if self.before else h).to(y.dtype)


class H1Mamba2(Mamba2):
    """:class:`~ssmkit.layers.Mamba2` with FalconH1's input multiplier, per-part in_proj multipliers and gate."""

    def __init__(self, d_model: int, *, ssm_in_multiplier: float, ssm_multipliers: tuple, rms_norm: bool,
                 norm_before_gate: bool, **mamba2) -> None:
        super().__init__(d_model, **mamba2)
        name = "H1Mamba2"
        mult = tuple(_number(name, "ssm_multipliers", m) for m in ssm_multipliers)
        if len(mult) != 5:
            raise ValueError(f"{name}: ssm_multipliers must hold 5 numbers (z, x, B, C, dt), got {ssm_multipliers!r}")
        self.ssm_multipliers = mult
        gn = self.ngroups * self.d_state
        sizes = (self.d_inner, self.d_inner, gn, gn, self.nheads)
        mup = torch.cat([torch.full((n,), m) for n, m in zip(sizes, mult, strict=True)])
        old = self.in_proj
        self.in_proj = MupLinear(d_model, old.out_features, old.bias is not None,
                                 _number(name, "ssm_in_multiplier", ssm_in_multiplier), mup)
        self.norm = H1GateNorm(self.d_inner, self.ngroups, self.norm.eps, check_bool(name, "rms_norm", rms_norm),
                               check_bool(name, "norm_before_gate", norm_before_gate))


@dataclass
class ParallelState(LayerState):
    """mamba: the Mamba-2 state; attn: the KV cache."""

    mamba: Mamba2State
    attn: AttentionState


class ParallelHybrid(SequenceLayer):
    """FalconH1's mixer (see the module docstring). Attention options: n_heads, n_kv_heads, head_dim, rotary_dim,
    rotary_base, key_multiplier, attn_bias; Mamba-2 options: d_state, d_conv, expand, headdim, ngroups, chunk_size,
    dt_limit, conv_bias, bias, norm_eps, ssm_rms_norm, norm_before_gate, ssm_multipliers, ssm_in_multiplier; and
    the three combination multipliers. x (batch, length, d_model) -> y (batch, length, d_model)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        key_multiplier: float = 1.0,
        attn_bias: bool = False,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int | float = 2,
        headdim: int | None = None,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        ssm_rms_norm: bool = False,
        norm_before_gate: bool = True,
        ssm_multipliers: tuple = (1.0, 1.0, 1.0, 1.0, 1.0),
        ssm_in_multiplier: float = 1.0,
        ssm_out_multiplier: float = 1.0,
        attn_in_multiplier: float = 1.0,
        attn_out_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.mamba = H1Mamba2(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                              ngroups=ngroups, chunk_size=chunk_size, dt_limit=tuple(dt_limit), conv_bias=conv_bias,
                              bias=bias, norm_eps=norm_eps, ssm_in_multiplier=ssm_in_multiplier,
                              ssm_multipliers=tuple(ssm_multipliers), rms_norm=ssm_rms_norm,
                              norm_before_gate=norm_before_gate)
        self.self_attn = GQAttention(d_model, n_heads, n_kv_heads, head_dim, rotary_dim, rotary_base,
                                     key_multiplier=key_multiplier, qkv_bias=attn_bias, out_bias=attn_bias)
        self.ssm_out_multiplier = _number(name, "ssm_out_multiplier", ssm_out_multiplier)
        self.attn_in_multiplier = _number(name, "attn_in_multiplier", attn_in_multiplier)
        self.attn_out_multiplier = _number(name, "attn_out_multiplier", attn_out_multiplier)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> ParallelState:
        return ParallelState(self.mamba.init_state(batch_size, dtype=dtype),
                             self.self_attn.init_state(batch_size, dtype=dtype))

    def _split(self, state: object) -> ParallelState:
        if not isinstance(state, ParallelState):
            raise TypeError(f"{type(self).__name__}: state must be a ParallelState, got {type(state).__name__}")
        return state

    def _combine(self, ys: Tensor, ya: Tensor) -> Tensor:
        return ys * self.ssm_out_multiplier + ya * self.attn_out_multiplier

    @state_kwargs
    def forward(self, x: Tensor, initial_state: ParallelState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, ParallelState) with ``return_final_state``."""
        x = self.check_input(x)
        s = None if initial_state is None else self._split(initial_state)
        ys, ms = self.mamba(x, None if s is None else s.mamba, reset=reset, return_final_state=True)
        ya, ks = self.self_attn(x * self.attn_in_multiplier, None if s is None else s.attn, reset=reset,
                                return_final_state=True)
        y = self._combine(ys, ya)
        return (y, ParallelState(ms, ks)) if return_final_state else y

    def step(self, x_t: Tensor, state: ParallelState) -> tuple[Tensor, ParallelState]:
        """x_t: (batch, d_model) -> (y_t, state)."""
        x_t = self.check_step_input(x_t)
        s = self._split(state)
        ys, ms = self.mamba.step(x_t, s.mamba)
        ya, ks = self.self_attn.step(x_t * self.attn_in_multiplier, s.attn)
        return self._combine(ys, ya), ParallelState(ms, ks)

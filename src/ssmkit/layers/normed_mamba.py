"""Mamba with RMS-normalised dt, B and C (FalconMamba, Jamba).

After ``x_proj`` the three data-dependent pieces (the low-rank dt, B and C) are each RMS-normalised over their
last dimension, weightless (FalconMamba) or with a learned weight each (Jamba: ``dt_layernorm``,
``b_layernorm``, ``c_layernorm``), before the selective scan. Everything else is :class:`~ssmkit.layers.Mamba`.
The norm computes in (at least) float32, in float64 for float64 layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan
from .base import to_compute
from .ffn import check_bool
from .mamba import Mamba, MambaState


def rms(x: Tensor, eps: float, weight: Tensor | None) -> Tensor:
    """RMS-normalise x over its last dim (in at least float32), times ``weight`` if given; x's dtype out."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


class NormedMamba(Mamba):
    """:class:`~ssmkit.layers.Mamba` with RMS norms on dt, B and C.

    Args (beyond Mamba's):
        bcdt_eps: the norms' epsilon (FalconMamba's ``mixer_rms_eps``, Jamba's ``rms_norm_eps``).
        bcdt_weights: learned norm weights (Jamba) or weightless norms (FalconMamba).

    forward: x (batch, length, d_model) -> y (batch, length, d_model). ``step`` runs the forward on one token.
    """

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
        bcdt_eps: float = 1e-6,
        bcdt_weights: bool = False,
    ) -> None:
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, dt_scale,
                         conv_bias, bias, reverse)
        name = type(self).__name__
        if isinstance(bcdt_eps, bool) or not isinstance(bcdt_eps, (int, float)) or not 0 < bcdt_eps < 1:
            raise ValueError(f"{name}: bcdt_eps must be a number in (0, 1), got {bcdt_eps!r}")
        self.bcdt_eps = float(bcdt_eps)
        self.bcdt_weights = check_bool(name, "bcdt_weights", bcdt_weights)
        if bcdt_weights:
            self.dt_layernorm = nn.Parameter(torch.ones(self.dt_rank))
            self.b_layernorm = nn.Parameter(torch.ones(self.d_state))
            self.c_layernorm = nn.Parameter(torch.ones(self.d_state))
        else:
            self.dt_layernorm = self.b_layernorm = self.c_layernorm = None

    def _mix(self, x: Tensor, state: MambaState | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        xi, z = to_compute(self, *self.in_proj(x).chunk(2, dim=-1))
        u, conv_state = self.conv1d(xi, None if state is None else state.conv, reset=reset)
        u = F.silu(u)
        dt_r, B, C = to_compute(self, *self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1))
        eps = self.bcdt_eps
        dt_r, B, C = rms(dt_r, eps, self.dt_layernorm), rms(B, eps, self.b_layernorm), rms(C, eps, self.c_layernorm)
        delta = to_compute(self, F.linear(dt_r, self.dt_proj.weight))
        A = -torch.exp(self.A_log)
        y, ssm_state = selective_scan(
            u, delta, A, B, C, self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm, reset=reset, return_final_state=True,
        )
        return self.out_proj(y), conv_state, ssm_state

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One token: x_t (batch, d_model) -> (y_t, new state), through the forward on a length-1 sequence."""
        x_t = self.check_step_input(x_t)
        y, state = self.forward(x_t.unsqueeze(1), state, return_final_state=True)
        return y.squeeze(1), state

    def step_weights(self):
        raise NotImplementedError(f"{type(self).__name__} has no fused step kernel (the dt/B/C norms)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bcdt_eps={self.bcdt_eps}, bcdt_weights={self.bcdt_weights}"

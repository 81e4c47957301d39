"""The Mamba paper's ablation layers (Table 1): a block with its inner SSM swapped between time-invariant and
selective.

    S6        the selective SSM alone ("no gate"): y = out(S6(x) + D ⊙ x), out = GELU then Linear (as S4D's default)
    H3S6      the H3 block (q, k, v; shift conv on k; SSM on k ⊙ v; times q; out_proj) whose diagonal SSM is S6
    MambaS4D  the Mamba block (in_proj; short conv + SiLU; SSM; times SiLU(z); out_proj) whose SSM is S4D (LTI)

S6 here is Mamba's selective recurrence on the layer's channels: Δ_t = softplus(W_Δ (W_x u_t)_{:r} + b_Δ),
B_t, C_t = (W_x u_t)_{r:}, h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, y_t = C_t · h_t + D u_t, with Mamba's
initialisation (A = −(1..N), D = 1, Δ log-uniform in [dt_min, dt_max]). The head-dim-1 H3 (the paper's default)
and S4D's ``output="none"`` core are the time-invariant counterparts.

States: S6State(ssm (batch, d_model, N)); H3S6State(shift (batch, d_model, shift_len − 1), ssm (batch, d_model,
N)); MambaS4DState(conv (batch, d_inner, d_conv − 1), ssm (batch, d_inner, d_state/2) complex).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan
from .base import LayerState, SequenceLayer, check_choice, check_d_model, no_autocast, state_kwargs, to_compute
from .mamba import check_dt_range, init_dt_bias, inner_size
from .s4d import S4D, S4DState, make_output
from .short_conv import ShortConv

OUTPUTS = ("gelu_linear", "glu", "none")


def _positive_int(owner: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
    return v


class SelectiveCore(nn.Module):
    """S6 on ``channels`` channels: u (batch, length, channels) -> S6(u) + D ⊙ u, and its one-token step."""

    def __init__(self, channels: int, d_state: int, dt_rank: int | str, dt_min: float, dt_max: float,
                 owner: str) -> None:
        super().__init__()
        self.d_state = _positive_int(owner, "d_state", d_state)
        if dt_rank == "auto":
            dt_rank = math.ceil(channels / 16)
        self.dt_rank = _positive_int(owner, "dt_rank", dt_rank)
        check_dt_range(owner, dt_min, dt_max, 1e-4)
        self.x_proj = nn.Linear(channels, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, channels, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32))
                                  .expand(channels, -1).clone())
        self.D = nn.Parameter(torch.ones(channels))
        with torch.no_grad():
            std = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
        init_dt_bias(self.dt_proj.bias, dt_min, dt_max, 1e-4)

    def _params(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt_r, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_r, self.dt_proj.weight), B, C

    def forward(self, u: Tensor, h0: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
        delta, B, C = self._params(u)
        return selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, delta_bias=self.dt_proj.bias,
                              delta_softplus=True, initial_state=h0, reset=reset, return_final_state=True)

    def step(self, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """u (batch, channels), h (batch, channels, N) -> (y (batch, channels), new h)."""
        delta, B, C = self._params(u)
        dt = F.softplus(delta + self.dt_proj.bias)  # (batch, channels)
        h = torch.exp(dt[..., None] * -torch.exp(self.A_log)) * h + (dt * u)[..., None] * B[:, None, :]
        return (h * C[:, None, :]).sum(-1) + self.D * u, h


@dataclass
class S6State(LayerState):
    """ssm: (batch, d_model, d_state)."""

    ssm: Tensor


class S6(SequenceLayer):
    """The selective SSM without a gate or a block around it (Table 1's "no gate, S6"), then S4D's output map.

    Args: d_model; d_state (N); dt_rank ("auto" = ceil(d_model / 16)); dt_min, dt_max (Δ init range); output:
    "gelu_linear" (default), "glu" or "none". x: (batch, length, d_model) -> y: (batch, length, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, dt_rank: int | str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, output: str = "gelu_linear") -> None:
        super().__init__()
        self.d_model = check_d_model("S6", d_model)
        self.core = SelectiveCore(d_model, d_state, dt_rank, dt_min, dt_max, "S6")
        self.output = check_choice("S6", "output", output, OUTPUTS)
        self.out = make_output(d_model, output)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> S6State:
        return S6State(ssm=torch.zeros(batch_size, self.d_model, self.core.d_state,
                                       dtype=dtype or self.param_dtype, device=self.param_device))

    @state_kwargs
    def forward(self, x: Tensor, initial_state: S6State | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        h0 = None if initial_state is None else self.check_state(initial_state, x.shape[0]).ssm
        u = to_compute(self, x)  # float32 under autocast: the core runs in float32, the output map follows autocast
        with no_autocast(x):
            y, h = self.core(u, h0, reset)
        y = self.out(y)
        return (y, S6State(ssm=h)) if return_final_state else y

    def step(self, x_t: Tensor, state: S6State) -> tuple[Tensor, S6State]:
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        y, h = self.core.step(x_t, self.check_state(state, x_t.shape[0]).ssm)
        return self.out(y), S6State(ssm=h)


@dataclass
class H3S6State(LayerState):
    """shift: (batch, d_model, shift_len − 1), the last k inputs; ssm: (batch, d_model, d_state)."""

    shift: Tensor
    ssm: Tensor


class H3S6(SequenceLayer):
    """H3 (head_dim 1) with its diagonal SSM replaced by S6: y = W_o(q ⊙ S6(shift(k) ⊙ v)).

    Args: d_model; d_state (N of S6); shift_len (taps of the shift conv on k); dt_rank, dt_min, dt_max (S6).
    """

    def __init__(self, d_model: int, d_state: int = 16, shift_len: int = 4, dt_rank: int | str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.d_model = check_d_model("H3S6", d_model)
        self.shift_len = _positive_int("H3S6", "shift_len", shift_len)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model) for _ in range(3))
        self.shift = ShortConv(d_model, shift_len, bias=False)
        self.ssm = SelectiveCore(d_model, d_state, dt_rank, dt_min, dt_max, "H3S6")
        self.out_proj = nn.Linear(d_model, d_model)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> H3S6State:
        dtype, dev = dtype or self.param_dtype, self.param_device
        return H3S6State(shift=torch.zeros(batch_size, self.d_model, self.shift_len - 1, dtype=dtype, device=dev),
                         ssm=torch.zeros(batch_size, self.d_model, self.ssm.d_state, dtype=dtype, device=dev))

    @state_kwargs
    def forward(self, x: Tensor, initial_state: H3S6State | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        st = None if initial_state is None else self.check_state(initial_state, x.shape[0])
        q, k, v = to_compute(self, self.q_proj(x), self.k_proj(x), self.v_proj(x))  # float32 under autocast
        k, shift = self.shift(k, None if st is None else st.shift, reset=reset)
        with no_autocast(x):
            y, h = self.ssm(k * v, None if st is None else st.ssm, reset)
        out = self.out_proj(q * y)
        return (out, H3S6State(shift=shift, ssm=h)) if return_final_state else out

    def step(self, x_t: Tensor, state: H3S6State) -> tuple[Tensor, H3S6State]:
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        st = self.check_state(state, x_t.shape[0])
        k, shift = self.shift.step(self.k_proj(x_t), st.shift)
        y, h = self.ssm.step(k * self.v_proj(x_t), st.ssm)
        return self.out_proj(self.q_proj(x_t) * y), H3S6State(shift=shift, ssm=h)


@dataclass
class MambaS4DState(LayerState):
    """conv: (batch, d_inner, d_conv − 1); ssm: (batch, d_inner, d_state/2) complex (S4D's state)."""

    conv: Tensor
    ssm: Tensor


class MambaS4D(SequenceLayer):
    """The Mamba block with a time-invariant S4D core: y = W_o(S4D(SiLU(conv(x W_x))) ⊙ SiLU(x W_z)).

    Args: d_model; d_state (S4D's N, even); d_conv; expand (d_inner = expand · d_model); init, dt_min, dt_max
    (S4D's initialisation). The S4D core has ``output="none"`` (y = SSM(u) + D u) and runs in ``mode`` ("auto",
    "conv" or "scan").
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int | float = 2,
                 init: str = "legs", mode: str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.d_model = check_d_model("MambaS4D", d_model)
        self.d_inner = inner_size("MambaS4D", d_model, expand)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = ShortConv(self.d_inner, _positive_int("MambaS4D", "d_conv", d_conv))
        self.ssm = S4D(self.d_inner, d_state, init=init, mode=mode, dt_min=dt_min, dt_max=dt_max, output="none")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> MambaS4DState:
        dtype = dtype or self.param_dtype
        return MambaS4DState(conv=self.conv1d.init_state(batch_size, dtype=dtype),
                             ssm=self.ssm.init_state(batch_size, dtype=dtype).s)

    @state_kwargs
    def forward(self, x: Tensor, initial_state: MambaS4DState | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        st = None if initial_state is None else self.check_state(initial_state, x.shape[0])
        xi, z = to_compute(self, *self.in_proj(x).chunk(2, dim=-1))  # float32 under autocast
        u, conv = self.conv1d(xi, None if st is None else st.conv, reset=reset)
        s0 = None if st is None else S4DState(s=st.ssm)
        if not return_final_state:  # S4D's conv mode is cheapest without the final-state terms
            return self.out_proj(self.ssm(F.silu(u), s0, reset=reset) * F.silu(z))
        y, s = self.ssm(F.silu(u), s0, reset=reset, return_final_state=True)
        return self.out_proj(y * F.silu(z)), MambaS4DState(conv=conv, ssm=s.s)

    def step(self, x_t: Tensor, state: MambaS4DState) -> tuple[Tensor, MambaS4DState]:
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        st = self.check_state(state, x_t.shape[0])
        xi, z = self.in_proj(x_t).chunk(2, dim=-1)
        u, conv = self.conv1d.step(xi, st.conv)
        y, s = self.ssm.step(F.silu(u), S4DState(s=st.ssm))
        return self.out_proj(y * F.silu(z)), MambaS4DState(conv=conv, ssm=s.s)


__all__ = ["H3S6", "H3S6State", "MambaS4D", "MambaS4DState", "S6", "S6State", "SelectiveCore"]

"""Mamba-3 block (arXiv 2603.15569): in_proj to (z, x, B, C, dt, A, trap, angles) -> RMSNorm on B and C ->
the Mamba-3 SSM (:func:`ssmkit.ops.mamba3`: trapezoidal discretisation, data-dependent rotation of B and C, B/C
biases, SISO or MIMO of rank R) -> silu(z) gate -> out_proj. There is no short convolution.

Parameter names follow the reference module (in_proj, dt_bias, B_bias, C_bias, B_norm, C_norm, D, mimo_x, mimo_z,
mimo_o, out_proj). Rotations turn adjacent pairs (2i, 2i+1) of B and C in both forms; the reference's MIMO kernel
pairs i with i + N/2, a fixed permutation of the N coordinates of the B/C projections and their norm and biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Mamba3ScanState, mamba3, mamba3_step
from ..ops.mamba3_stack import Mamba3StepWeights
from .base import LayerState, SequenceLayer, check_d_model, check_state_dtypes, flip_reset, state_kwargs, to_compute
from .mamba import _positive_int, check_dt_range, cut_at_segment_start, init_dt_bias, inner_size, state_dtype
from .mamba2 import _default_headdim


@dataclass
class Mamba3State(LayerState):
    """angle (batch, nheads, S); ssm (batch, nheads, headdim, d_state); k: the last rotated key and x: the last
    input, (batch, nheads, d_state) / (batch, nheads, headdim) SISO or (batch, R, nheads, ·) MIMO."""

    angle: Tensor
    ssm: Tensor
    k: Tensor
    x: Tensor


class Mamba3(SequenceLayer):
    """Mamba-3's SSM block.

    Args:
        d_model: model width. d_state: N, the state size per head. expand: d_inner = expand * d_model.
        headdim: channels per head (None: 64 when it divides d_inner, else the largest divisor below it).
        ngroups: groups sharing B and C (must divide nheads).
        mimo_rank: None for SISO; an int R >= 1 for the MIMO form of rank R (x and z projected up per rank by
            ``mimo_x``, ``mimo_z``, the outputs down by ``mimo_o``).
        rope_fraction: 0.5 or 1.0, the share of the N state dimensions rotated (S = that share of N, made
            even, halved, angles).
        dt_min, dt_max, dt_init_floor: dt_bias init (log-uniform, inverse softplus).
        A_floor: A = -max(softplus(A_proj), A_floor). norm_eps: epsilon of the B and C RMSNorms.
        bias: biases in in_proj and out_proj. reverse: run right to left, honouring segment starts.

    forward: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 128, expand: int | float = 2, headdim: int | None = None,
                 ngroups: int = 1, mimo_rank: int | None = None, rope_fraction: float = 0.5, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, A_floor: float = 1e-4, norm_eps: float = 1e-5,
                 bias: bool = False, reverse: bool = False) -> None:
        super().__init__()
        owner = "Mamba3"
        self.d_model = check_d_model(owner, d_model)
        self.d_state = _positive_int(owner, "d_state", d_state)
        self.d_inner = inner_size(owner, d_model, expand)
        self.headdim = _default_headdim(self.d_inner) if headdim is None else _positive_int(owner, "headdim",
                                                                                              headdim)
        if self.d_inner % self.headdim:
            raise ValueError(f"{owner}: headdim={headdim} must divide d_inner = expand * d_model = {self.d_inner}")
        self.nheads = self.d_inner // self.headdim
        self.ngroups = _positive_int(owner, "ngroups", ngroups)
        if self.nheads % self.ngroups:
            raise ValueError(f"{owner}: ngroups={ngroups} must divide nheads = d_inner / headdim = {self.nheads}")
        self.mimo = mimo_rank is not None
        self.rank = 1 if mimo_rank is None else _positive_int(owner, "mimo_rank", mimo_rank)
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"{owner}: rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        self.rope_fraction = rope_fraction
        rotated = int(self.d_state * rope_fraction)
        self.n_angles = (rotated - rotated % 2) // 2
        if self.n_angles < 1:
            raise ValueError(f"{owner}: d_state={d_state} with rope_fraction={rope_fraction} rotates no pair; "
                             "need d_state * rope_fraction >= 2")
        check_dt_range(owner, dt_min, dt_max, dt_init_floor)
        if not A_floor > 0:
            raise ValueError(f"{owner}: A_floor must be > 0, got {A_floor!r}")
        if not isinstance(reverse, bool):
            raise TypeError(f"{owner}: reverse must be a bool, got {type(reverse).__name__}")
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.A_floor, self.reverse = float(A_floor), reverse

        H, G, N, R, P = self.nheads, self.ngroups, self.d_state, self.rank, self.headdim
        self.bc_dim = R * G * N
        self.splits = [self.d_inner, self.d_inner, self.bc_dim, self.bc_dim, H, H, H, self.n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.splits), bias=bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.B_bias = nn.Parameter(torch.empty(H, R, N))
        self.C_bias = nn.Parameter(torch.empty(H, R, N))
        self.B_norm = nn.RMSNorm(N, eps=norm_eps)
        self.C_norm = nn.RMSNorm(N, eps=norm_eps)
        if self.mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, R, P))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P))
        self.D = nn.Parameter(torch.empty(H))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """B_bias = C_bias = 1, D = 1, mimo_x = mimo_o = 1 / R, mimo_z = 1, dt_bias = softplus^-1(dt) with dt
        log-uniform in [dt_min, dt_max] (as the reference)."""
        self.B_bias.fill_(1.0)
        self.C_bias.fill_(1.0)
        self.D.fill_(1.0)
        if self.mimo:
            self.mimo_x.fill_(1.0 / self.rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.rank)
        init_dt_bias(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> Mamba3State:
        """Zero state in the accumulation dtype of ``dtype`` (float32 for 16-bit)."""
        _positive_int("Mamba3.init_state", "batch_size", batch_size)
        dt = state_dtype(dtype or self.dt_bias.dtype)
        kx = (batch_size, self.nheads) if not self.mimo else (batch_size, self.rank, self.nheads)
        z = (lambda *s: torch.zeros(*s, dtype=dt, device=self.dt_bias.device))  # noqa: E731
        return Mamba3State(angle=z(batch_size, self.nheads, self.n_angles),
                           ssm=z(batch_size, self.nheads, self.headdim, self.d_state),
                           k=z(*kx, self.d_state), x=z(*kx, self.headdim))

    def _check_state(self, state: object, x: Tensor) -> Mamba3State:
        self.check_state(state, x.shape[0])
        check_state_dtypes(type(self).__name__, state, self.expected_state(x.shape[0], self.act_dtype(x)))
        return state

    # ---------------------------------------------------------------------------------------- forward
    def _inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (..., d_model) -> z, xs (..., [R,] H, P), dt, A, trap (..., H), B, C (..., [R,] G, N), angles
        (..., H, S): the op's arguments (x and z projected up per rank in the MIMO form)."""
        H, P, G, N, R = self.nheads, self.headdim, self.ngroups, self.d_state, self.rank
        z, xs, B, C, dd_dt, dd_A, trap, ang = to_compute(self, *self.in_proj(x).split(self.splits, dim=-1))
        lead = x.shape[:-1]
        z, xs = z.unflatten(-1, (H, P)), xs.unflatten(-1, (H, P))
        B = self.B_norm(B.unflatten(-1, (R, G, N)))
        C = self.C_norm(C.unflatten(-1, (R, G, N)))
        if self.mimo:
            xs = xs.unsqueeze(-3) * self.mimo_x.transpose(0, 1).to(xs.dtype)  # (..., R, H, P)
            z = z.unsqueeze(-3) * self.mimo_z.transpose(0, 1).to(z.dtype)
        else:
            B, C = B.squeeze(-3), C.squeeze(-3)
        dt = F.softplus(dd_dt + self.dt_bias.to(dd_dt.dtype))
        A = -F.softplus(dd_A).clamp(min=self.A_floor)
        angles = (math.pi * torch.tanh(ang)).unsqueeze(-2).expand(*lead, H, self.n_angles)
        return z, xs, dt, A, torch.sigmoid(trap), B, C, angles

    def _ssm_params(self, dtype: torch.dtype) -> dict[str, Tensor]:
        sq = (lambda t: t) if self.mimo else (lambda t: t.squeeze(1))  # noqa: E731
        return {"B_bias": sq(self.B_bias).to(dtype), "C_bias": sq(self.C_bias).to(dtype), "D": self.D.to(dtype)}

    def _output(self, y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        """Gate and (MIMO) project down: y, z (..., [R,] H, P) -> (..., d_model)."""
        y = y * F.silu(z)
        if self.mimo:
            y = (y * self.mimo_o.transpose(0, 1).to(y.dtype)).sum(-3)
        return self.out_proj(y.flatten(-2).to(dtype))

    def _param_dtype(self, xs: Tensor) -> torch.dtype:
        # parameters go to the op in the activations' dtype, or float32 with 16-bit activations
        return torch.float32 if xs.dtype in (torch.float16, torch.bfloat16) else xs.dtype

    @state_kwargs
    def forward(self, x: Tensor, initial_state: Mamba3State | None = None, *, reset: Tensor | None = None,
                return_final_state: bool = False):
        """x: (batch, length, d_model) -> y, or (y, final state) with ``return_final_state``. With
        ``reverse=True`` the state passed in is the context to the right of x (cut at segment starts)."""
        x = self.check_input(x)
        self.check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        if initial_state is not None:
            self._check_state(initial_state, x)
        reset_in = reset
        if self.reverse:
            x, reset = x.flip(1), flip_reset(reset)
        z, xs, dt, A, trap, B, C, angles = self._inputs(x)
        st0 = None if initial_state is None else Mamba3ScanState(initial_state.angle, initial_state.ssm,
                                                                 initial_state.k, initial_state.x)
        y, st = mamba3(xs, dt, A, trap, B, C, angles=angles, **self._ssm_params(self._param_dtype(xs)),
                       initial_state=st0, reset=reset, return_final_state=True)
        y = self._output(y, z, x.dtype)
        if self.reverse:
            y = y.flip(1)
        if not return_final_state:
            return y
        new = Mamba3State(angle=st.angle, ssm=st.ssm, k=st.k, x=st.x)
        return y, (cut_at_segment_start(new, reset_in) if self.reverse else new)

    def step(self, x_t: Tensor, state: Mamba3State) -> tuple[Tensor, Mamba3State]:
        """One token, O(1): x_t (batch, d_model) -> (y_t (batch, d_model), new state). With ``reverse=True``
        feed tokens from last to first."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        self._check_state(state, x_t)
        z, xs, dt, A, trap, B, C, angles = self._inputs(x_t)
        y, st = mamba3_step(xs, dt, A, trap, B, C, Mamba3ScanState(state.angle, state.ssm, state.k, state.x),
                            angles=angles, **self._ssm_params(self._param_dtype(xs)))
        return self._output(y, z, x_t.dtype), Mamba3State(angle=st.angle, ssm=st.ssm, k=st.k, x=st.x)

    def step_weights(self) -> Mamba3StepWeights:
        """The parameters as the stack decode kernel takes them (:mod:`ssmkit.ops.mamba3_stack`)."""
        m = (lambda name: getattr(self, name) if self.mimo else None)  # noqa: E731
        return Mamba3StepWeights(
            in_w=self.in_proj.weight, in_b=self.in_proj.bias, dt_b=self.dt_bias, b_bias=self.B_bias,
            c_bias=self.C_bias, bn_w=self.B_norm.weight, cn_w=self.C_norm.weight, d=self.D, mimo_x=m("mimo_x"),
            mimo_z=m("mimo_z"), mimo_o=m("mimo_o"), out_w=self.out_proj.weight, out_b=self.out_proj.bias,
            ngroups=self.ngroups, headdim=self.headdim, n_angles=self.n_angles, a_floor=self.A_floor,
            b_eps=self.B_norm.eps, c_eps=self.C_norm.eps)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, nheads={self.nheads}, "
                f"headdim={self.headdim}, ngroups={self.ngroups}, mimo_rank={self.rank if self.mimo else None}, "
                f"n_angles={self.n_angles}, reverse={self.reverse}")

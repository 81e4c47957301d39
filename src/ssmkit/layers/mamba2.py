"""Mamba-2 (SSD) block: in_proj to (z, x, B, C, dt) -> short causal conv + SiLU on xBC -> SSD -> gated RMSNorm
-> out_proj.

Parameter names, shapes and initialisation follow transformers' ``Mamba2Mixer`` (in_proj, conv1d, dt_bias,
A_log, D, norm.weight, out_proj), so weights map one to one (see :mod:`ssmkit.interop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ssd
from ..ops._numba_gated_norm import gated_rms_norm
from ..ops.linear_scan import use_fused
from .base import (
    LayerState,
    check_d_model,
    to_compute,
)
from .mamba import (
    ConvScanBlock,
    _positive_int,
    check_dt_range,
    init_dt_bias,
    inner_size,
    state_dtype,
)
from .short_conv import ShortConv


@dataclass
class Mamba2State(LayerState):
    """conv: (batch, d_inner + 2 * ngroups * d_state, d_conv - 1); ssm: (batch, nheads, headdim, d_state)."""

    conv: Tensor
    ssm: Tensor


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), normalised over groups of ``group_size`` channels, times ``weight``.

    y, z: (..., dim) -> (..., dim). Computed in float32 (at least) and returned in y's dtype.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size={group_size} must divide dim={dim}")
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        if y.shape[-1] != self.dim or z.shape != y.shape:
            raise ValueError(f"GatedRMSNorm: y and z must both be (..., {self.dim}), got {tuple(y.shape)} and "
                             f"{tuple(z.shape)}")
        # plain tensors only: under torch.export / ONNX tracing they are fake subclasses the kernel cannot read
        if (use_fused(y, z, self.weight) and type(y) is torch.Tensor and type(z) is torch.Tensor
                and not torch.compiler.is_compiling() and y.dtype in (torch.float32, torch.float64)
                and z.dtype == y.dtype == self.weight.dtype):  # the shapes are checked above
            return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)  # one fused sweep each way
        acc = state_dtype(y.dtype)
        g = F.silu(z.to(acc)) * y.to(acc)
        g = F.rms_norm(g.unflatten(-1, (self.dim // self.group_size, self.group_size)), (self.group_size,),
                       eps=self.eps)
        return self.weight * g.flatten(-2).to(y.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group_size={self.group_size}, eps={self.eps}"


def _default_headdim(d_inner: int, preferred: int = 64) -> int:
    """The preferred head size when it divides d_inner, else the largest divisor of d_inner below it."""
    return max(p for p in range(1, min(preferred, d_inner) + 1) if d_inner % p == 0)


class Mamba2(ConvScanBlock):
    """Mamba-2's SSD block.

    Args:
        d_model: model width.
        d_state: N, the state size per head.
        d_conv: width of the causal depthwise conv on (x, B, C).
        expand: d_inner = expand * d_model.
        headdim: channels per head (nheads = d_inner / headdim). None picks 64 when it divides d_inner, else
            the largest divisor of d_inner below 64 (so ``Mamba2(d_model)`` works for any width).
        ngroups: groups sharing B and C (must divide nheads); also the RMSNorm groups.
        chunk_size: SSD chunk length.
        dt_min, dt_max, dt_init_floor: dt_bias init (log-uniform, inverse softplus).
        dt_limit: (lo, hi) clamp of dt after the softplus.
        conv_bias: bias in the conv; bias: biases in in_proj and out_proj.
        norm_eps: epsilon of the gated RMSNorm.
        dt_rank: carried only for transformers' ``Mamba2Config.time_step_rank``, which no Mamba-2 computation
            reads (dt comes straight from in_proj); None means transformers' default ceil(d_model / 16).
        reverse: run right to left (anti-causal conv, reversed scan), honouring segment starts.

    forward: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    state_cls = Mamba2State

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int | float = 2,
        headdim: int | None = None,
        ngroups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        dt_rank: int | None = None,
        reverse: bool = False,
    ) -> None:
        super().__init__()
        owner = "Mamba2"
        self.d_model = check_d_model(owner, d_model)
        self.d_state = _positive_int(owner, "d_state", d_state)
        self.d_conv = _positive_int(owner, "d_conv", d_conv)
        self.d_inner = inner_size(owner, d_model, expand)
        if headdim is None:
            self.headdim = _default_headdim(self.d_inner)
        else:
            self.headdim = _positive_int(owner, "headdim", headdim)
        if self.d_inner % self.headdim:
            raise ValueError(f"{owner}: headdim={headdim} must divide d_inner = expand * d_model "
                             f"= {self.d_inner}")
        self.nheads = self.d_inner // self.headdim
        self.ngroups = _positive_int(owner, "ngroups", ngroups)
        if self.nheads % self.ngroups:
            raise ValueError(f"{owner}: ngroups={ngroups} must divide nheads = d_inner / headdim "
                             f"= {self.nheads}")
        self.chunk_size = _positive_int(owner, "chunk_size", chunk_size)
        self.dt_rank = None if dt_rank is None else _positive_int(owner, "dt_rank", dt_rank)
        check_dt_range(owner, dt_min, dt_max, dt_init_floor)
        if len(dt_limit) != 2 or not 0.0 <= dt_limit[0] <= dt_limit[1]:
            raise ValueError(f"{owner}: dt_limit must be (lo, hi) with 0 <= lo <= hi, got {dt_limit!r}")
        if not isinstance(reverse, bool):
            raise TypeError(f"{owner}: reverse must be a bool, got {type(reverse).__name__}")
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.reverse = reverse

        d_inner, H, G, N = self.d_inner, self.nheads, self.ngroups, self.d_state
        self.conv_dim = d_inner + 2 * G * N
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + H, bias=bias)
        self.conv1d = ShortConv(self.conv_dim, d_conv, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(d_inner, d_inner // G, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A_log = log(1..nheads), D = 1, dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.nheads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        init_dt_bias(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> Mamba2State:
        """Zero state: conv (batch, conv_dim, d_conv - 1) in ``dtype``; ssm (batch, nheads, headdim, d_state)
        in its accumulation dtype (float32 for 16-bit)."""
        _positive_int("Mamba2.init_state", "batch_size", batch_size)
        dtype = dtype or self.A_log.dtype
        dev = self.A_log.device
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, dtype=dtype, device=dev),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, dtype=state_dtype(dtype),
                            device=dev),
        )

    def _dt(self, dt: Tensor) -> Tensor:
        dt = F.softplus(dt + self.dt_bias)
        lo, hi = self.dt_limit
        if lo > 0.0 or hi < math.inf:
            dt = dt.clamp(min=lo, max=hi)
        return dt

    # ---------------------------------------------------------------------------------------- forward
    def _mix(self, x: Tensor, state: Mamba2State | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Left-to-right x (batch, length, d_model) -> (y, conv state, ssm state)."""
        batch, length, _ = x.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        # under autocast in_proj runs in its dtype and to_compute brings the outputs back to float32
        z, xBC, dt = to_compute(self, *self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1))
        xBC, conv_state = self.conv1d(xBC, None if state is None else state.conv, reset=reset)
        xs, B, C = F.silu(xBC).split([self.d_inner, G * N, G * N], dim=-1)
        y, ssm_state = ssd(
            xs.unflatten(-1, (H, P)), self._dt(dt), -torch.exp(self.A_log), B.unflatten(-1, (G, N)),
            C.unflatten(-1, (G, N)), D=self.D, chunk_size=self.chunk_size,
            initial_state=None if state is None else state.ssm, reset=reset, return_final_state=True,
        )
        return self.out_proj(self.norm(y.reshape(batch, length, self.d_inner), z)), conv_state, ssm_state

    def step(self, x_t: Tensor, state: Mamba2State) -> tuple[Tensor, Mamba2State]:
        """One token, O(1): x_t (batch, d_model) -> (y_t (batch, d_model), new state).

        With ``reverse=True`` feed tokens from last to first.
        """
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        self._check_state(state, x_t)
        batch = x_t.shape[0]
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(x_t).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC, conv_state = self.conv1d.step(xBC, state.conv)
        xs, B, C = F.silu(xBC).split([self.d_inner, G * N, G * N], dim=-1)
        h = state.ssm.contiguous()
        acc, R = h.dtype, H // G
        dt = self._dt(dt).to(acc)  # (batch, H)
        dA = torch.exp(dt * -torch.exp(self.A_log.to(acc)))  # (batch, H)
        xh = xs.to(acc).view(batch, H, P)
        # h' = dA h + (dt x) B^T: one new state tensor, the outer product added in place by a batched GEMM
        hn = h * dA.view(batch, H, 1, 1)
        hg = hn.view(batch * G, R * P, N)
        hg.baddbmm_((dt.view(batch, H, 1) * xh).view(batch * G, R * P, 1), B.to(acc).reshape(batch * G, 1, N))
        y = torch.bmm(hg, C.to(acc).reshape(batch * G, N, 1)).view(batch, H, P)
        y = torch.addcmul(y, xh, self.D.to(acc).view(H, 1)).view(batch, self.d_inner)
        y = self.out_proj(self.norm(y.to(x_t.dtype), z))
        return y, Mamba2State(conv=conv_state, ssm=hn)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"nheads={self.nheads}, headdim={self.headdim}, ngroups={self.ngroups}, "
                f"chunk_size={self.chunk_size}, "
                f"reverse={self.reverse}")

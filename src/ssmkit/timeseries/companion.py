"""SpaceTime's companion-matrix SSM: a per-channel linear recurrence whose state matrix is a companion matrix.

For each of ``d_model`` channels, with state size N::

    A = [[0, 0, ..., 0, a_0    ],       x_t = A x_{t-1} + b u_t,    y_t = c . x_t + d u_t,    x_{-1} = 0
         [1, 0, ..., 0, a_1    ],
         [0, 1, ..., 0, a_2    ],       so y = K * u + d u with the kernel K_j = c . A^j b.
         [0, 0, ..., 1, a_{N-1}]]

``a`` is scaled to ||a||_1 <= 1, which keeps every eigenvalue of A (the roots of z^N - sum_i a_i z^i) in the
closed unit disc, so the kernel cannot blow up. ``A v`` costs O(N): shift v down one place and add a v_{N-1}.

Closed loop (SpaceTime's decoder): after the context the layer feeds itself, u_t = k . x_{t-1}, so the
forecast of any horizon is a rollout of x_t = (A + b k^T) x_{t-1} from the state at the end of the context.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import fft_conv


class CompanionSSM(nn.Module):
    """Per-channel companion SSM (``d_model`` channels, state size ``d_state``).

    ``forward(u)``: u (batch, length, d_model) -> y (batch, length, d_model) through the FFT convolution;
    ``recurrence(u)`` computes the same y step by step (the oracle); ``final_state(u)`` is x at the last step
    (batch, d_model, d_state); ``closed_loop(x, steps)`` rolls the state forward feeding back u_t = k . x_{t-1}
    and returns (y (batch, steps, d_model), u (batch, steps, d_model)).
    """

    def __init__(self, d_model: int, d_state: int = 32, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1:
            raise ValueError(f"CompanionSSM: d_model and d_state must be >= 1, got {d_model}, {d_state}")
        kw = {"dtype": dtype or torch.get_default_dtype()}
        self.d_model, self.d_state = d_model, d_state
        self.a = nn.Parameter(torch.randn(d_model, d_state, **kw) / d_state)
        self.b = nn.Parameter(torch.randn(d_model, d_state, **kw) / math.sqrt(d_state))
        self.c = nn.Parameter(torch.randn(d_model, d_state, **kw) / math.sqrt(d_state))
        self.d = nn.Parameter(torch.zeros(d_model, **kw))
        self.k = nn.Parameter(torch.zeros(d_model, d_state, **kw))

    def a_scaled(self) -> Tensor:
        """The last column of each A, (d_model, d_state), scaled to an l1 norm of at most 1."""
        return self.a / self.a.abs().sum(-1, keepdim=True).clamp(min=1.0)

    def matvec(self, v: Tensor) -> Tensor:
        """A v for a batch of states v (..., d_model, d_state)."""
        shifted = torch.cat([torch.zeros_like(v[..., :1]), v[..., :-1]], dim=-1)
        return shifted + self.a_scaled() * v[..., -1:]

    def dense(self) -> Tensor:
        """The companion matrices A as dense (d_model, d_state, d_state) tensors."""
        n = self.d_state
        shift = torch.diag(torch.ones(n - 1, dtype=self.a.dtype, device=self.a.device), -1)
        last = torch.zeros_like(shift)
        last[:, -1] = 1.0
        return shift + self.a_scaled()[:, :, None] * last

    def state_kernel(self, length: int) -> Tensor:
        """A^j b for j < length: (d_model, d_state, length), by doubling: [V, A^m V] with A^m squared each
        round (log2(length) dense products instead of ``length`` sequential steps)."""
        v, power = self.b[..., None], self.dense()
        while v.shape[-1] < length:
            v = torch.cat([v, power @ v], dim=-1)
            power = power @ power
        return v[..., :length]

    def state_kernel_loop(self, length: int) -> Tensor:
        """The same as :meth:`state_kernel` by ``length`` steps of v <- A v (the oracle)."""
        v, out = self.b, []
        for _ in range(length):
            out.append(v)
            v = self.matvec(v)
        return torch.stack(out, dim=-1)

    def kernel(self, length: int) -> Tensor:
        """K_j = c . A^j b: (d_model, length)."""
        return torch.einsum("hn,hnl->hl", self.c, self.state_kernel(length))

    def _check(self, u: Tensor) -> Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model or u.shape[1] < 1:
            raise ValueError(f"CompanionSSM: u must be (batch, length >= 1, {self.d_model}), got {tuple(u.shape)}")
        if u.dtype != self.a.dtype:
            raise TypeError(f"CompanionSSM: u has dtype {u.dtype} but the parameters {self.a.dtype}")
        return u

    def forward(self, u: Tensor) -> Tensor:
        u = self._check(u)
        return fft_conv(u, self.kernel(u.shape[1]), D=self.d)

    def recurrence(self, u: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Step by step from state ``x`` (default zero) -> (y (batch, length, d_model), final x)."""
        u = self._check(u)
        if x is None:
            x = u.new_zeros(u.shape[0], self.d_model, self.d_state)
        ys = []
        for t in range(u.shape[1]):
            x = self.matvec(x) + self.b * u[:, t, :, None]
            ys.append((self.c * x).sum(-1) + self.d * u[:, t])
        return torch.stack(ys, dim=1), x

    def final_state(self, u: Tensor) -> Tensor:
        """x at the last step from a zero start: sum_j A^j b u_{L-1-j}, (batch, d_model, d_state)."""
        u = self._check(u)
        return torch.einsum("blh,hnl->bhn", u.flip(1), self.state_kernel(u.shape[1]))

    def closed_loop(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Roll ``steps`` steps from x (batch, d_model, d_state) with u_t = k . x_{t-1} -> (y, u), each
        (batch, steps, d_model)."""
        if steps < 1:
            raise ValueError(f"CompanionSSM.closed_loop: steps must be >= 1, got {steps}")
        ys, us = [], []
        for _ in range(steps):
            u = (self.k * x).sum(-1)
            x = self.matvec(x) + self.b * u[..., None]
            ys.append((self.c * x).sum(-1) + self.d * u)
            us.append(u)
        return torch.stack(ys, dim=1), torch.stack(us, dim=1)

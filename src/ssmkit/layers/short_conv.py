"""Short causal depthwise convolution (Mamba's width-4 conv, H3's shift filter) honouring segment resets.

    y_t = bias + sum_{j=0}^{W-1} weight[:, W-1-j] * x_{t-j}
    (taps j that reach back across a segment start are dropped)

The state is the last ``W - 1`` inputs, ``(batch, channels, W - 1)`` oldest first, with entries that lie
before the most recent segment start already zeroed, so that splitting a sequence and stepping token by token
both equal the whole forward. With ``reverse=True`` the convolution is anti-causal (y_t reads x_t ..
x_{t+W-1}); it is computed as the causal convolution of the time-flipped sequence, and the state then holds
the inputs in processing order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _numba_short_conv as K
from ..ops import threads as T
from ..ops.linear_scan import use_fused
from .base import flip_reset

ACTIVATIONS = (None, "silu")


def _check_conv_args(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None, reset: Tensor | None
) -> None:
    if not isinstance(x, Tensor) or x.ndim != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"short_conv: x must have shape (batch, length, channels), got {got}")
    ch = x.shape[2]
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != ch or weight.shape[1] < 1:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"short_conv: weight must have shape (channels={ch}, width>=1), got {got}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != ch):
        raise ValueError(f"short_conv: bias must have shape ({ch},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"short_conv: x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    if state is not None:
        want = (x.shape[0], ch, weight.shape[1] - 1)
        if not isinstance(state, Tensor) or tuple(state.shape) != want:
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"short_conv: initial_state must have shape (batch, channels, width-1)={want}, "
                             f"got {got}")
        if state.dtype != x.dtype:
            raise TypeError(f"short_conv: initial_state has dtype {state.dtype} but x has {x.dtype}; they must match")
    if reset is not None and (not isinstance(reset, Tensor) or reset.dtype != torch.bool
                              or tuple(reset.shape) != tuple(x.shape[:2])):
        got = f"{tuple(reset.shape)} {reset.dtype}" if isinstance(reset, Tensor) else type(reset).__name__
        raise ValueError(f"short_conv: reset must be a bool tensor of shape (batch, length)="
                         f"{tuple(x.shape[:2])}, got {got}")


def short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise short convolution with segment resets and carried state, optionally followed by SiLU.

    Args:
        x: (batch, length, channels).
        weight: (channels, width); ``weight[:, -1]`` multiplies the current input.
        bias: (channels,) or None.
        initial_state: (batch, channels, width - 1), the previous inputs (oldest first); None means zeros.
        reset: bool (batch, length); True at t starts a new segment (no tap reaches back across it).
        reverse: anti-causal (right-to-left) convolution: ``initial_state`` holds the inputs to the right of x and
            the returned state is for the chunk to the left (zeroed in rows where x starts a segment).
        activation: None, or "silu": y = silu(conv) (fused into the kernel; the state holds the conv's inputs).

    Returns:
        y (batch, length, channels) and the new state (batch, channels, width - 1).

    Float32/64 CPU tensors run a fused numba kernel (forward and backward; x is read in place, so a channel slice
    of a wider tensor is not copied); other inputs, or inside ``ssmkit.ops.fused_kernels(False)``, a sum of
    shifted taps in PyTorch.
    """
    _check_conv_args(x, weight, bias, initial_state, reset)
    if activation not in ACTIVATIONS:
        raise ValueError(f"short_conv: activation must be None or 'silu', got {activation!r}")
    if reverse:
        y, new_state = short_conv(x.flip(1), weight, bias, initial_state=initial_state, reset=flip_reset(reset),
                                  activation=activation)
        if reset is not None:  # x starts a segment: nothing carries on into the chunk to its left
            new_state = new_state * (~reset[:, 0]).to(new_state.dtype)[:, None, None]
        return y.flip(1), new_state
    batch, length, channels = x.shape
    width = weight.shape[1]
    act = F.silu if activation == "silu" else (lambda t: t)  # noqa: E731
    if width == 1:
        y = x * weight[:, 0]
        return act(y if bias is None else y + bias), x.new_zeros(batch, channels, 0)
    ctx = x.new_zeros(batch, width - 1, channels) if initial_state is None else initial_state.transpose(1, 2)
    segp = None
    if reset is not None:
        seg = torch.cumsum(reset, 1)  # segment id of each position; the state's positions have id 0
        segp = torch.cat([seg.new_zeros(batch, width - 1), seg], 1)
    if use_fused(x) and x.dtype in (torch.float32, torch.float64) and x.shape[1] > 0:  # empty: the plain path
        b = bias if bias is not None else x.new_zeros(channels)
        y = _ShortConvFn.apply(x, ctx.contiguous(), weight.t(), b, segp, activation == "silu")
        tail = (x[:, length - width + 1:] if length >= width - 1 else torch.cat([ctx, x], 1)[:, -(width - 1):])
    else:
        xp = torch.cat([ctx, x], 1)  # (batch, width - 1 + length, channels)
        y = act(_taps(xp, weight, bias, segp, length))
        tail = xp[:, -(width - 1):]
    if segp is not None:
        tail = tail * (segp[:, -(width - 1):] == segp[:, -1:]).unsqueeze(-1).to(x.dtype)
    return y, tail.transpose(1, 2).contiguous()


def _taps(xp: Tensor, weight: Tensor, bias: Tensor | None, segp: Tensor | None, length: int) -> Tensor:
    """Plain PyTorch path: y_t = bias + sum_k weight[:, k] xp[t + k], tap k masked if it crosses a segment."""
    width = weight.shape[1]
    y = xp[:, width - 1:] * weight[:, width - 1]
    if bias is not None:
        y = y + bias
    for k in range(width - 1):
        tap = xp[:, k: k + length]
        if segp is not None:
            same = segp[:, k: k + length] == segp[:, width - 1:]
            tap = tap * same.unsqueeze(-1).to(xp.dtype)
        y = torch.addcmul(y, tap, weight[:, k])
    return y


# ------------------------------------------------------------------------------------------ fused CPU kernel
def _flat(x: Tensor) -> tuple[np.ndarray, int, int, int]:
    """x (batch, length, channels) with unit channel stride as (flat storage array, offset, batch stride, row
    stride) for the kernels (a copy only when the channel stride is not 1 or rows overlap)."""
    if x.stride(2) != 1 or x.stride(1) < x.shape[2] or (x.shape[0] > 1 and x.stride(0) < x.stride(1) * x.shape[1]):
        x = x.contiguous()
    batch, length, channels = x.shape
    span = (batch - 1) * x.stride(0) + (length - 1) * x.stride(1) + channels
    flat = torch.as_strided(x, (span,), (1,))
    return flat.numpy(), 0, x.stride(0), x.stride(1)


class _ShortConvFn(torch.autograd.Function):
    """Fused depthwise conv (+ SiLU) of x (batch, L, C) after the context ctx (batch, W-1, C), weight wt (W, C),
    bias (C,); x is read in place (see :mod:`ssmkit.ops._numba_short_conv`)."""

    @staticmethod
    def forward(ctx, x: Tensor, cx: Tensor, wt: Tensor, bias: Tensor, segp: Tensor | None, silu: bool) -> Tensor:
        x_, cx_, wt_, b_ = x.detach(), cx.detach().contiguous(), wt.detach().contiguous(), bias.detach().contiguous()
        seg = torch.zeros(1, 1, dtype=torch.int64) if segp is None else segp.contiguous()
        out = torch.empty(x_.shape, dtype=x_.dtype)
        with T.kernel_threads(out.numel() * wt_.shape[0]):
            K.conv_fwd(*_flat(x_), cx_.numpy(), wt_.numpy(), b_.numpy(), seg.numpy(), segp is not None, silu,
                       out.numpy())
        ctx.save_for_backward(x_, cx_, wt_, b_, seg)
        ctx.use_seg, ctx.silu = segp is not None, silu
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, cx, wt, b, seg = ctx.saved_tensors
        g = g.contiguous()
        nbat, length, nch = x.shape
        width = wt.shape[0]
        ntask = nbat * (-(-(length + width - 1) // K.ROWS))
        gx, gcx = torch.empty(x.shape, dtype=x.dtype), torch.empty_like(cx)
        gw_part = torch.zeros(ntask, width, nch, dtype=x.dtype)
        gb_part = torch.zeros(ntask, nch, dtype=x.dtype)
        with T.kernel_threads(g.numel() * width):
            K.conv_bwd(*_flat(x), cx.numpy(), wt.numpy(), b.numpy(), seg.numpy(), ctx.use_seg, ctx.silu, g.numpy(),
                       gx.numpy(), gcx.numpy(), gw_part.numpy(), gb_part.numpy())
        gb = gb_part.sum(0) if ctx.needs_input_grad[3] else None
        return gx, gcx, gw_part.sum(0), gb, None, None


def short_conv_step(
    x_t: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of :func:`short_conv`: x_t (batch, channels), state (batch, channels, width - 1)
    -> (y_t (batch, channels), new state). The same code serves ``reverse`` (state is in processing order)."""
    window = torch.cat([state, x_t.unsqueeze(-1)], -1)  # (batch, channels, width)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return y, window[:, :, 1:]


class ShortConv(nn.Module):
    """Depthwise short convolution module with nn.Conv1d-compatible parameters.

    Parameters ``weight`` (channels, 1, width) and ``bias`` (channels,) have the names, shapes and default
    initialisation of ``nn.Conv1d(channels, channels, width, groups=channels)``, so state dicts map one to
    one.
    """

    def __init__(self, channels: int, width: int = 4, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ShortConv: {name} must be a positive int, got {v!r}")
        self.channels, self.width = channels, width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform(±1/sqrt(width)) for weight and bias: nn.Conv1d's default for a depthwise conv."""
        bound = 1.0 / math.sqrt(self.width)
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def forward(
        self, x: Tensor, initial_state: Tensor | None = None, *, reset: Tensor | None = None, reverse: bool = False,
        activation: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x: (batch, length, channels) -> (y (batch, length, channels), state (batch, channels, width-1));
        ``activation="silu"`` applies SiLU to y inside the kernel."""
        return short_conv(x, self.weight[:, 0], self.bias, initial_state=initial_state, reset=reset, reverse=reverse,
                          activation=activation)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x_t: (batch, channels), state (batch, channels, width - 1) -> (y_t, new state)."""
        return short_conv_step(x_t, self.weight[:, 0], self.bias, state)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> Tensor:
        """Zero state (batch_size, channels, width - 1)."""
        return torch.zeros(batch_size, self.channels, self.width - 1, dtype=dtype or self.weight.dtype,
                           device=self.weight.device)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}, bias={self.bias is not None}"

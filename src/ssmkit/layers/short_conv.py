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

import torch
from torch import Tensor, nn


def flip_reset(reset: Tensor | None) -> Tensor | None:
    """Segment starts for the time-flipped sequence: reset (batch, length) -> (batch, length).

    A segment starting at t (left to right) means nothing flows from t into t - 1 when running right to left,
    so in flipped coordinates a new segment starts at s = length - t. Position 0 of the flipped sequence never
    starts one: the state handed in (the context to the right) flows into it.
    """
    if reset is None:
        return None
    out = torch.zeros_like(reset)
    out[:, 1:] = reset[:, 1:].flip(1)
    return out


def _check_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None) -> None:
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
            raise ValueError(f"short_conv: state must have shape (batch, channels, width-1)={want}, "
                             f"got {got}")
        if state.dtype != x.dtype:
            raise TypeError(f"short_conv: state has dtype {state.dtype} but x has {x.dtype}; they must match")


def short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    state: Tensor | None = None,
    reset: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Depthwise short convolution with segment resets and carried state.

    Args:
        x: (batch, length, channels).
        weight: (channels, width); ``weight[:, -1]`` multiplies the current input.
        bias: (channels,) or None.
        state: (batch, channels, width - 1), the previous inputs (oldest first); None means zeros.
        reset: bool (batch, length); True at t starts a new segment (no tap reaches back across it).
        reverse: anti-causal (right-to-left) convolution; state and reset as in the module docstring.

    Returns:
        y (batch, length, channels) and the new state (batch, channels, width - 1).
    """
    _check_conv_args(x, weight, bias, state)
    if reverse:
        y, new_state = short_conv(x.flip(1), weight, bias, state=state, reset=flip_reset(reset))
        return y.flip(1), new_state
    batch, length, channels = x.shape
    width = weight.shape[1]
    y = x * weight[:, width - 1]
    if bias is not None:
        y = y + bias
    if width == 1:
        return y, x.new_zeros(batch, channels, 0)
    ctx = x.new_zeros(batch, width - 1, channels) if state is None else state.transpose(1, 2)
    xp = torch.cat([ctx, x], 1)  # (batch, width - 1 + length, channels)
    segp = None
    if reset is not None:
        seg = torch.cumsum(reset, 1)  # segment id of each position; the state's positions have id 0
        segp = torch.cat([seg.new_zeros(batch, width - 1), seg], 1)
    for j in range(1, width):  # lag j reads x_{t-j} = xp[:, width - 1 - j + t]
        tap = xp[:, width - 1 - j: width - 1 - j + length]
        if segp is not None:
            same = segp[:, width - 1 - j: width - 1 - j + length] == seg
            tap = tap * same.unsqueeze(-1).to(x.dtype)
        y = torch.addcmul(y, tap, weight[:, width - 1 - j])
    tail = xp[:, -(width - 1):]
    if segp is not None:
        tail = tail * (segp[:, -(width - 1):] == seg[:, -1:]).unsqueeze(-1).to(x.dtype)
    return y, tail.transpose(1, 2).contiguous()


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
        self, x: Tensor, state: Tensor | None = None, *, reset: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        """x: (batch, length, channels) -> (y (batch, length, channels), state (batch, channels, width-1))."""
        return short_conv(x, self.weight[:, 0], self.bias, state=state, reset=reset, reverse=reverse)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x_t: (batch, channels), state (batch, channels, width - 1) -> (y_t, new state)."""
        return short_conv_step(x_t, self.weight[:, 0], self.bias, state)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> Tensor:
        """Zero state (batch_size, channels, width - 1)."""
        return torch.zeros(batch_size, self.channels, self.width - 1, dtype=dtype or self.weight.dtype,
                           device=self.weight.device)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, width={self.width}, bias={self.bias is not None}"

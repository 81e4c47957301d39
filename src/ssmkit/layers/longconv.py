"""LongConv: a learned long convolution (Fu et al., "Simple Hardware-Efficient Long Convolutions").

    kernel: (d_model, kernel_len), a free parameter
    k_eff = dropout(squash(smooth(kernel)))
    smooth(k)[l] = mean(k[l - p//2 .. l + p//2])          centred average pool of odd width p, zero-padded
    squash(k) = sign(k) * max(|k| - lam, 0)               soft threshold
    y_t = sum_{s=0}^{kernel_len-1} k_eff[s] x_{t-s} + D x_t    causal depthwise convolution

The order (smooth, then squash, then kernel dropout) follows the paper's regularised long convolution.

Modes: ``"conv"`` evaluates the convolution with an FFT (:func:`ssmkit.ops.fft_conv`); ``"scan"``
evaluates the same sum directly (a depthwise ``conv1d``: the rolling-window computation that ``step`` does
one token at a time); ``"auto"`` takes the direct form when at most ``AUTO_DIRECT_TAPS`` taps can reach an
output, else the FFT. All give the same function.

State: the kernel is finite, so the whole recurrent state is the window of the last ``kernel_len - 1`` inputs,
``buffer: (batch, d_model, kernel_len - 1)``, oldest first. Entries from before the latest segment start
(``reset``) are stored as zeros, so nothing reaches back across a segment start, in this call or a later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import fft_conv
from ..ops.linear_scan import compute_dtype
from .base import (
    LayerState,
    SequenceLayer,
    autocast_dtype,
    check_choice,
    check_d_model,
    no_autocast,
    state_kwargs,
)

MODES = ("auto", "conv", "scan")
AUTO_DIRECT_TAPS = 32


@dataclass
class LongConvState(LayerState):
    """buffer: (batch, d_model, kernel_len - 1), last inputs oldest first; zero before a segment start."""

    buffer: Tensor


def causal_depthwise_conv(u: Tensor, k: Tensor, mode: str) -> Tensor:
    """y_t = sum_s k[:, s] u_{t-s} (zero history). u: (n, T, channels); k: (channels, K) -> (n, T, channels).

    mode "conv": FFT; "scan": direct evaluation; "auto": direct if at most AUTO_DIRECT_TAPS taps reach an
    output. Taps beyond lag T - 1 cannot reach any output and are dropped before the work starts.
    """
    T = u.shape[1]
    k = k[:, :T]
    if mode == "auto":
        mode = "scan" if k.shape[1] <= AUTO_DIRECT_TAPS else "conv"
    if mode == "conv":
        return fft_conv(u, k)
    K = k.shape[1]
    y = F.conv1d(F.pad(u.transpose(1, 2), (K - 1, 0)), k.flip(-1).unsqueeze(1), groups=k.shape[0])
    return y.transpose(1, 2)


class LongConv(SequenceLayer):
    """A learned long convolution per channel with squash/smooth regularisation and a D skip.

    Args:
        d_model: channels.
        kernel_len: taps of the learned kernel (fixed; default 1024). Any length >= 1 works with any sequence
            length: taps longer than the input simply never reach an output. ``step`` keeps the last
            ``kernel_len - 1`` inputs, so memory per sequence is ``d_model * (kernel_len - 1)``.
        lam: soft-threshold λ of the squash (0 disables it).
        smooth: width of the centred average-pool smoothing of the kernel; 0 (or 1) disables it, else odd.
        kernel_dropout: dropout probability on the effective kernel in training mode (each forward or step
            draws its own mask, so step and forward agree in eval mode only).
        mode: "auto" | "conv" | "scan" (see module docstring); may be changed on the instance.
        init_scale: the raw kernel starts as ``init_scale * randn`` (above ``lam`` for most taps, so the
            squash does not start with most weights dead).

    x: (batch, length, d_model) -> y: (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        kernel_len: int = 1024,
        lam: float = 0.003,
        smooth: int = 0,
        kernel_dropout: float = 0.0,
        mode: str = "auto",
        init_scale: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = check_d_model("LongConv", d_model)
        if isinstance(kernel_len, bool) or not isinstance(kernel_len, int) or kernel_len < 1:
            raise ValueError(f"LongConv: kernel_len must be a positive int, got {kernel_len!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"LongConv: lam must be a float >= 0, got {lam!r}")
        bad_smooth = not isinstance(smooth, int) or smooth < 0 or (smooth > 1 and smooth % 2 == 0)
        if isinstance(smooth, bool) or bad_smooth:
            raise ValueError(f"LongConv: smooth must be 0 (off) or an odd pool width >= 1, got {smooth!r}")
        if isinstance(kernel_dropout, bool) or not isinstance(kernel_dropout, (int, float)) or not (
            0 <= kernel_dropout < 1
        ):
            raise ValueError(f"LongConv: kernel_dropout must be a float in [0, 1), got {kernel_dropout!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"LongConv: init_scale must be a float > 0, got {init_scale!r}")
        self.kernel_len = kernel_len
        self.lam = float(lam)
        self.smooth = smooth
        self.mode = check_choice("LongConv", "mode", mode, MODES)
        self.kernel = nn.Parameter(torch.randn(d_model, kernel_len) * init_scale)
        self.D = nn.Parameter(torch.randn(d_model))
        self.kernel_dropout = nn.Dropout(kernel_dropout)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, kernel_len={self.kernel_len}, lam={self.lam}, smooth={self.smooth}, "
            f"kernel_dropout={self.kernel_dropout.p}, mode={self.mode!r}"
        )

    # ------------------------------------------------------------------------------------------- kernel
    def effective_kernel(self) -> Tensor:
        """(d_model, kernel_len): dropout(squash(smooth(kernel)))."""
        k = self.kernel
        if self.smooth > 1:
            k = F.avg_pool1d(k.unsqueeze(1), self.smooth, stride=1, padding=self.smooth // 2).squeeze(1)
        if self.lam > 0:
            k = torch.sign(k) * F.relu(k.abs() - self.lam)
        return self.kernel_dropout(k)

    # -------------------------------------------------------------------------------------------- state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> LongConvState:
        dtype = self.kernel.dtype if dtype is None else dtype
        return LongConvState(
            torch.zeros(batch_size, self.d_model, self.kernel_len - 1, dtype=dtype, device=self.kernel.device)
        )

    def _check_dtype(self, x: Tensor, name: str) -> None:
        """x must have the kernel's dtype, or inside torch.autocast (float32 kernel) the autocast dtype."""
        if x.dtype != self.kernel.dtype and not (self.kernel.dtype == torch.float32
                                                 and x.dtype == autocast_dtype(x)):
            raise TypeError(
                f"LongConv: {name} has dtype {x.dtype} but the layer's parameters are {self.kernel.dtype}; "
                "cast the input or the layer explicitly"
            )

    def _checked_state(self, state: object, batch_size: int) -> LongConvState:
        state = self.check_state(state, batch_size)
        self._check_dtype(state.buffer, "state.buffer")
        return state  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ forward
    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: LongConvState | None = None,
        *,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model); (y, LongConvState) if
        ``return_final_state``."""
        x = self.check_input(x)
        self._check_dtype(x, "x")
        reset = self.check_reset(reset, x)
        mode = check_choice("LongConv", "mode", self.mode, MODES)
        batch = x.shape[0]
        buf = None if initial_state is None else self._checked_state(initial_state, batch).buffer
        if buf is not None and reset is not None:
            buf = buf * (~reset[:, 0]).to(buf.dtype)[:, None, None]
        acc = compute_dtype(x.dtype)  # 16-bit inputs accumulate in float32
        with no_autocast(x):  # the convolution in the compute dtype, even inside torch.autocast
            k = self.effective_kernel().to(acc)
            xa, ba = x.to(acc), None if buf is None else buf.to(acc)
            if reset is None or not bool(reset[:, 1:].any()):
                y = self._conv_rows(xa, ba, k, mode)
            else:
                y = self._conv_segments(xa, ba, k, reset, mode)
        y = y.to(x.dtype)
        if not return_final_state:
            return y
        return y, LongConvState(self._final_buffer(x, buf, reset))

    def _conv_rows(self, u: Tensor, prefix: Tensor | None, k: Tensor, mode: str) -> Tensor:
        """Rows u: (n, T, d_model), each continuing from prefix (n, d_model, kernel_len - 1) or from zeros."""
        if prefix is not None and prefix.shape[-1] > 0:
            P = prefix.shape[-1]
            y = causal_depthwise_conv(torch.cat([prefix.transpose(1, 2), u], 1), k, mode)[:, P:]
        else:
            y = causal_depthwise_conv(u, k, mode)
        return y + u * self.D.to(u.dtype)

    def _conv_segments(self, x: Tensor, buf: Tensor | None, k: Tensor, reset: Tensor, mode: str) -> Tensor:
        """Exact conv of a packed batch: every segment is convolved on its own, zero-padded at its end.

        Segments are gathered into padded batches bucketed by length (next power of two), so the padding at
        most doubles the work. Each row's first segment continues from ``buf`` (already zeroed where
        reset[:, 0]).
        """
        batch, length, d = x.shape
        starts = reset.clone()
        starts[:, 0] = True
        rows, pos = starts.nonzero(as_tuple=True)  # row-major: segments in order
        flat = rows * length + pos
        lengths = torch.diff(flat, append=flat.new_tensor([batch * length]))
        xf = x.reshape(batch * length, d)
        idx_parts: list[Tensor] = []
        val_parts: list[Tensor] = []

        def run(sel: Tensor, width: int, prefix: Tensor | None) -> None:
            off = torch.arange(width, device=x.device)
            idx = flat[sel, None] + off
            valid = off < lengths[sel, None]
            seg = torch.where(valid[..., None], xf[idx.clamp(max=batch * length - 1)], xf.new_zeros(()))
            y = self._conv_rows(seg, prefix, k, mode)
            idx_parts.append(idx[valid])
            val_parts.append(y[valid])

        first = pos == 0
        run(first, int(lengths[first].max()), buf)
        rest = ~first
        if bool(rest.any()):
            widths = torch.zeros_like(lengths)
            widths[rest] = torch.tensor(
                [min(1 << max(int(n) - 1, 0).bit_length(), length) for n in lengths[rest].tolist()],
                dtype=lengths.dtype, device=lengths.device,
            )
            for w in sorted(set(widths[rest].tolist())):
                run(rest & (widths == w), int(w), None)
        y = torch.index_copy(xf.new_zeros(batch * length, d), 0, torch.cat(idx_parts), torch.cat(val_parts))
        return y.reshape(batch, length, d)

    def _final_buffer(self, x: Tensor, buf: Tensor | None, reset: Tensor | None) -> Tensor:
        """The last kernel_len - 1 inputs (reaching into buf for short calls), zero before the last reset."""
        batch, length, _ = x.shape
        P = self.kernel_len - 1
        if P == 0:
            return x.new_zeros(batch, self.d_model, 0)
        prev = buf if buf is not None else x.new_zeros(batch, self.d_model, P)
        window = torch.cat([prev, x.transpose(1, 2)], -1)[..., -P:]
        if reset is None:
            return window
        t = torch.arange(length, device=x.device)
        last = torch.where(reset, t, torch.full_like(t, -P - 1)).amax(1)  # (batch,) last segment start
        pos = torch.arange(length - P, length, device=x.device)  # positions of the window (negative: old buf)
        return window * (pos[None] >= last[:, None]).to(window.dtype)[:, None, :]

    # --------------------------------------------------------------------------------------------- step
    def step(self, x_t: Tensor, state: LongConvState) -> tuple[Tensor, LongConvState]:
        """One token, rolling window: x_t (batch, d_model) -> (y_t (batch, d_model), state); O(kernel_len)."""
        x_t = self.check_step_input(x_t)
        self._check_dtype(x_t, "x_t")
        state = self._checked_state(state, x_t.shape[0])
        window = torch.cat([state.buffer, x_t.unsqueeze(-1)], -1)  # (batch, d_model, kernel_len), oldest 1st
        acc = compute_dtype(x_t.dtype)
        k = self.effective_kernel().to(acc)
        y = (window.to(acc) * k.flip(-1)).sum(-1) + self.D.to(acc) * x_t.to(acc)
        return y.to(x_t.dtype), LongConvState(window[..., 1:])


__all__ = ["LongConv", "LongConvState", "causal_depthwise_conv", "MODES"]

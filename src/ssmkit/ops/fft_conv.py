"""Long convolutions through the FFT: causal, or bidirectional (a causal plus an anti-causal kernel)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_flag, check_same, check_shape, check_tensor
from .linear_scan import compute_dtype


def fast_fft_size(n: int) -> int:
    """The smallest even 2/3/5-smooth integer >= n (pocketfft is fast on these)."""
    if n <= 2:
        return 2
    best = 1 << (n - 1).bit_length()  # next power of two: always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 * 2  # even
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fft_conv(u: Tensor, k: Tensor, *, D: Tensor | None = None, bidirectional: bool = False) -> Tensor:
    """Per-channel long convolution of u with k through rfft/irfft.

    Causal: y_t = sum_{s=0}^{K-1} k[c, s] u_{t-s}.  Bidirectional: y_t = sum_s k[0, c, s] u_{t-s} +
    sum_s k[1, c, s] u_{t+s} (both sums include lag 0). Then + D u_t. Taps beyond the sequence length are
    unused.

    Args:
        u: (batch, length, channels), real.
        k: (channels, kernel_len), or (2, channels, kernel_len) when ``bidirectional``; any kernel_len >= 1.
        D: (channels,) skip.
        bidirectional: k[0] is the causal kernel and k[1] the anti-causal one.

    Returns:
        y (batch, length, channels) in u's dtype; accumulated in float32 for 16-bit inputs.
    """
    check_tensor("u", u, ndim=3, what="(batch, length, channels)")
    if u.is_complex():
        raise TypeError(f"fft_conv takes real tensors, got u with dtype {u.dtype}")
    batch, length, channels = u.shape
    if length == 0:
        raise ValueError(f"u must have length >= 1, got shape {tuple(u.shape)}")
    bidirectional = check_flag("bidirectional", bidirectional)
    if bidirectional:
        check_tensor("k", k, ndim=3, what="(2, channels, kernel_len) for bidirectional=True")
        expected = (2, channels, k.shape[-1])
        what = "(2, channels, kernel_len) for bidirectional=True"
    else:
        check_tensor("k", k, ndim=2, what="(channels, kernel_len)")
        expected = (channels, k.shape[-1])
        what = "(channels, kernel_len)"
    check_shape("k", k, expected, what)
    if k.shape[-1] < 1:
        raise ValueError(f"k must have kernel_len >= 1, got shape {tuple(k.shape)}")
    if D is not None:
        check_tensor("D", D, ndim=1, what="(channels,)")
        check_shape("D", D, (channels,), "(channels,)")
    check_same("u", u, k=k, D=D)

    cdt = compute_dtype(u.dtype)
    taps = min(k.shape[-1], length)
    n = fast_fft_size(length + taps)
    kf = k[..., :taps].to(cdt)
    if bidirectional:
        # one circular kernel: causal lags at 0..taps-1, anti-causal lag s at n - s (lag 0 added to index 0)
        head = torch.cat([kf[0, :, :1] + kf[1, :, :1], kf[0, :, 1:]], -1)
        kc = torch.cat([head, kf.new_zeros(channels, n - 2 * taps + 1), kf[1, :, 1:].flip(-1)], -1)
    else:
        kc = kf
    uf = u.to(cdt).transpose(1, 2)  # (batch, channels, length): FFT along the contiguous axis
    Y = torch.fft.rfft(uf, n=n) * torch.fft.rfft(kc, n=n)
    y = torch.fft.irfft(Y, n=n)[..., :length].transpose(1, 2)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt)
    return y.to(u.dtype)

"""Short conv fused with SiLU and read in place (ssmkit.ops._numba_short_conv) against the plain PyTorch taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers.short_conv import short_conv
from ssmkit.ops import fused_kernels
from tests.layers.contract import assert_close, random_reset


def _leaves(width: int, length: int, seed: int):
    """x as the first half of a wider tensor (a strided channel slice, as Mamba's in_proj split gives), weight,
    bias, state; float64."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(2, length, 10, generator=g, dtype=torch.float64).requires_grad_()
    w, b, s = (torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
               for shape in ((5, width), (5,), (2, 5, width - 1)))
    return wide, w, b, s


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_conv_silu_on_a_channel_slice_matches_torch_taps_with_grads(width, reverse):
    """Fused (SiLU inside the kernel, x read in place from a strided view) against the torch taps then F.silu:
    outputs, state and every gradient (x, weight, bias, initial state) with resets, in float64. The backward
    splits 150 + width - 1 positions into several tiles, so the tile boundaries are crossed."""
    length = 150
    leaves = _leaves(width, length, width + 2 * reverse)
    reset = random_reset(2, length, width, p=0.1)
    gy = torch.randn(2, length, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    results = []
    for fused in (True, False):
        with fused_kernels(fused):
            wide, w, b, s = leaves
            x = wide[:, :, :5]
            assert not x.is_contiguous()
            y, state = short_conv(x, w, b, initial_state=s, reset=reset, reverse=reverse, activation="silu")
            grads = torch.autograd.grad((y * gy).sum() + state.pow(2).sum(), leaves)
        results.append((y, state, *grads))
    for name, a, c in zip(("y", "state", "dwide", "dw", "dbias", "dstate"), *results, strict=True):
        assert_close(a, c, 1e-12, f"fused vs torch {name}")
    assert torch.equal(results[0][2][:, :, 5:], torch.zeros(2, length, 5, dtype=torch.float64))


def test_fused_conv_silu_equals_conv_then_silu_and_contiguous_input():
    """activation='silu' is silu of the plain conv; a strided slice gives the same bits as its contiguous copy;
    shorter than the width, the state comes from the initial state and x."""
    wide, w, b, s = _leaves(4, 40, 0)
    x = wide.detach()[:, :, 5:]
    y_silu, st_silu = short_conv(x, w, b, initial_state=s, activation="silu")
    y_lin, st_lin = short_conv(x.contiguous(), w, b, initial_state=s)
    assert_close(y_silu, F.silu(y_lin), 1e-13, "silu(conv)")
    assert torch.equal(st_silu, st_lin)
    y2, st2 = short_conv(x.contiguous(), w, b, initial_state=s, activation="silu")
    assert torch.equal(y_silu, y2)
    y_short, st_short = short_conv(x[:, :2], w, b, initial_state=s, activation="silu")
    assert torch.equal(st_short, torch.cat([s[:, :, 2:], x[:, :2].transpose(1, 2)], 2))
    assert torch.equal(y_short, y_silu[:, :2])


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        short_conv(torch.randn(1, 4, 3), torch.randn(3, 4), activation="relu")

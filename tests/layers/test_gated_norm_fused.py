"""Mamba-2's gated RMSNorm: the fused numba sweep (ops/_numba_gated_norm.py) equals the plain torch path."""

import pytest
import torch

import ssmkit.layers.mamba2 as mamba2_mod
from ssmkit.layers.mamba2 import GatedRMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("group_size", [12, 4])
def test_fused_equals_plain(dtype, tol, group_size, monkeypatch):
    """Outputs and gradients w.r.t. y, z (a strided view, as in Mamba2 where z is a slice of in_proj's output)
    and the weight; the plain path is the oracle."""
    g = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(12, group_size).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12, generator=g, dtype=dtype) + 0.5)
    y = torch.randn(2, 7, 12, generator=g, dtype=dtype).requires_grad_()
    zz = torch.randn(2, 7, 30, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(2, 7, 12, generator=g, dtype=dtype)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(mamba2_mod, "use_fused", lambda *t, f=fused: f)
        out = norm(y, zz[..., 5:17])
        results.append([out, *torch.autograd.grad((out * w).sum(), [y, zz, norm.weight])])
    for got, want in zip(*results, strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < tol


def test_16bit_keeps_the_plain_path():
    norm = GatedRMSNorm(8, 8).to(torch.bfloat16)
    y, z = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    assert norm(y, z).dtype == torch.bfloat16


@pytest.mark.parametrize("width", [14, 16])
def test_a_wrong_width_is_refused_not_read_past_the_weight(width):
    """The fused sweep must not take an input whose width is not the norm's (review finding: it read past the
    weight): a one-line error names the shapes."""
    norm = GatedRMSNorm(12, 4)
    y = torch.randn(2, width)
    with pytest.raises(ValueError, match=r"GatedRMSNorm: y and z must both be \(\.\.\., 12\)"):
        norm(y, torch.randn(2, width))

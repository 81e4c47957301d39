"""S4D/S4 state passing in "auto" mode takes the closed-form convolution path (no length-L scan) from
AUTO_CONV_STATE_MIN positions on, the path sequence parallelism uses on every pass; it must equal the token-by-token
recurrence (outputs and final state) and the scan's gradients, in float64."""

from __future__ import annotations

import pytest
import torch

import ssmkit.layers.s4d as s4d_mod
from ssmkit.layers import S4, S4D


def _steps(layer, x, s0):
    """Oracle: the layer's own one-token step, left to right (right to left for reverse layers)."""
    state, ys = s0, []
    order = range(x.shape[1] - 1, -1, -1) if layer.reverse else range(x.shape[1])
    for t in order:
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    if layer.reverse:
        ys.reverse()
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("make", [lambda: S4D(6, d_state=8), lambda: S4D(6, d_state=8, reverse=True),
                                  lambda: S4D(6, d_state=8, disc="bilinear"), lambda: S4(6, d_state=8, init="ptd")])
def test_auto_final_state_is_closed_form_and_exact(monkeypatch, make):
    monkeypatch.setattr(s4d_mod, "AUTO_CONV_STATE_MIN", 16)
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 41, 6, dtype=torch.float64, requires_grad=True)
    s0 = layer.init_state(2)
    s0.s.normal_()

    def boom(*a, **k):
        raise AssertionError("auto mode ran the scan for a long stateful call")

    real_scan = s4d_mod.diagonal_scan
    monkeypatch.setattr(s4d_mod, "diagonal_scan", boom)
    s0.s.requires_grad_()
    y, fin = layer(x, s0, return_final_state=True)
    w = torch.randn_like(y)
    v = torch.randn_like(fin.s)
    loss = (y * w).sum() + (fin.s * v.conj()).real.sum()
    got = torch.autograd.grad(loss, [x, s0.s, *layer.parameters()])
    monkeypatch.setattr(s4d_mod, "diagonal_scan", real_scan)
    with torch.no_grad():
        y_ref, fin_ref = _steps(layer, x, type(s0)(s=s0.s.detach()))
    assert float((y - y_ref).abs().max()) < 1e-10
    assert float((fin.s - fin_ref.s).abs().max()) < 1e-10
    layer.mode = "scan"
    y2, fin2 = layer(x, s0, return_final_state=True)
    want = torch.autograd.grad((y2 * w).sum() + (fin2.s * v.conj()).real.sum(), [x, s0.s, *layer.parameters()])
    for g, h in zip(got, want, strict=True):
        assert float((g - h).abs().max()) < 1e-10 * max(1.0, float(h.abs().max()))


def test_short_stateful_calls_still_scan(monkeypatch):
    layer = S4D(4, d_state=4).double()
    monkeypatch.setattr(s4d_mod, "diagonal_conv", lambda *a, **k: (_ for _ in ()).throw(AssertionError("conv")))
    layer(torch.randn(1, s4d_mod.AUTO_CONV_STATE_MIN - 1, 4, dtype=torch.float64), return_final_state=True)

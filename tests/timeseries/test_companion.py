"""SpaceTime's companion SSM: FFT convolution = recurrence, doubled kernel = step loop, closed loop = the
open-loop convolution fed with the same inputs; all in float64. Forecaster shapes and the seasonal residual."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.timeseries.classify import SSMClassifier
from ssmkit.timeseries.companion import CompanionSSM
from ssmkit.timeseries.models import FORECASTERS, SSM_FORECASTERS, SeasonalResidual, seasonal_naive


def _layer(d_model: int, d_state: int, seed: int) -> CompanionSSM:
    torch.manual_seed(seed)
    m = CompanionSSM(d_model, d_state, dtype=torch.float64)
    with torch.no_grad():
        m.a.normal_()  # l1 norm above 1: exercises the scaling
        m.d.normal_()
        m.k.normal_(std=0.3)
    return m


@given(d_model=st.integers(1, 4), d_state=st.integers(1, 6), length=st.integers(1, 40), seed=st.integers(0, 99))
def test_convolution_equals_recurrence_float64(d_model, d_state, length, seed):
    m = _layer(d_model, d_state, seed)
    u = torch.randn(2, length, d_model, dtype=torch.float64)
    y_rec, x_rec = m.recurrence(u)
    torch.testing.assert_close(m(u), y_rec, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.final_state(u), x_rec, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.state_kernel(length), m.state_kernel_loop(length), rtol=1e-10, atol=1e-13)


def test_companion_matrix_and_stability():
    m = _layer(3, 5, 0)
    a = m.dense()
    v = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(m.matvec(v), (a @ v[..., None])[..., 0])
    assert m.a_scaled().abs().sum(-1).max() <= 1.0 + 1e-12
    assert torch.linalg.eigvals(a).abs().max() <= 1.0 + 1e-9  # roots of z^N - sum a_i z^i with ||a||_1 <= 1


def test_closed_loop_equals_open_loop_fed_its_own_inputs():
    m = _layer(3, 4, 1)
    u = torch.randn(2, 12, 3, dtype=torch.float64)
    _, x = m.recurrence(u)
    y_closed, u_fed = m.closed_loop(x, 7)
    # the fed inputs are k . x_{t-1}, checked by stepping the state by hand
    xs = x
    for t in range(7):
        torch.testing.assert_close(u_fed[:, t], (m.k * xs).sum(-1))
        xs = m.dense() @ xs[..., None]
        xs = xs[..., 0] + m.b * u_fed[:, t, :, None]
    y_open = m(torch.cat([u, u_fed], dim=1))[:, 12:]
    torch.testing.assert_close(y_closed, y_open, rtol=1e-10, atol=1e-12)


def test_layer_errors():
    m = _layer(3, 4, 0)
    with pytest.raises(ValueError, match="u must be"):
        m(torch.zeros(1, 5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(1, 5, 3))


NO_SKTIME = importlib.util.find_spec("sktime") is None


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(n == "dlinear" and NO_SKTIME, reason="DLinear is sktime's"))
    for n in sorted(FORECASTERS)])
def test_forecaster_shapes_and_seasonal_residual(name):
    torch.manual_seed(0)
    x = torch.randn(3, 12, 2)
    net = FORECASTERS[name](12, 5, 2)
    assert net(x).shape == (3, 5, 2)
    with pytest.raises(ValueError, match=r"x must be \(batch, 12, 2\)"):
        net(torch.randn(3, 11, 2))
    if name not in SSM_FORECASTERS:  # DLinear, a baseline, takes no base
        return
    res = SeasonalResidual(net, 4)
    for p in res.parameters():  # a zero correction leaves exactly the seasonal-naive forecast
        torch.nn.init.zeros_(p)
    expect = x[:, [8, 9, 10, 11, 8]]
    torch.testing.assert_close(res(x), expect)
    torch.testing.assert_close(seasonal_naive(x, 4, 5), expect)


def test_classifier_shape_and_bidirectionality():
    torch.manual_seed(0)
    clf = SSMClassifier(2, 3, d_model=8, n_layers=1).double()
    x = torch.randn(1, 20, 2, dtype=torch.float64)
    assert clf(x).shape == (1, 3)
    later = x.clone()
    later[:, -1] += 1.0
    layer = clf.layers[0]
    # the first position's features see the last step (a causal layer's would not)
    h, h_later = (clf.embed(v.transpose(1, 2)).transpose(1, 2) for v in (x, later))
    assert not torch.allclose(layer(h)[:, 0], layer(h_later)[:, 0])
    with pytest.raises(ValueError, match=r"x must be \(batch, length >= 1, 2\)"):
        clf(torch.randn(1, 20, 3, dtype=torch.float64))

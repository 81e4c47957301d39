"""The forecast bases a neural correction is added to: the seasonal profile and seasonal naive with drift
against loop oracles, the validation choice among the bases, the zero-initialised output layer that starts
training at the base, DLinear (sktime's network) against its definition, the purged validation split, and
TrainConfig's one-line errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.timeseries.models import (
    FORECASTERS,
    SSM_FORECASTERS,
    DLinear,
    SeasonalResidual,
    base_forecast,
    seasonal_drift,
    seasonal_naive,
    seasonal_profile,
)
from ssmkit.timeseries.protocol import TrainConfig, choose_base, train_forecaster

#: DLinear is sktime's network; sktime is in the optional ``data`` extra
needs_sktime = pytest.mark.skipif(importlib.util.find_spec("sktime") is None,
                                  reason="DLinear is sktime's: pip install sktime")


@settings(max_examples=25, deadline=None)
@given(season=st.integers(1, 6), k=st.integers(1, 4), extra=st.integers(0, 5), horizon=st.integers(1, 13),
       seed=st.integers(0, 99))
def test_seasonal_profile_against_a_loop(season, k, extra, horizon, seed):
    context = season * k + extra
    x = torch.tensor(np.random.default_rng(seed).normal(size=(2, context, 3)))
    got = seasonal_profile(x, season, horizon)
    whole = context // season
    want = torch.zeros(2, horizon, 3, dtype=torch.float64)
    for t in range(horizon):  # phase of step t: the positions context - season + (t % season) - j * season
        for j in range(whole):
            want[:, t] += x[:, context - season + t % season - j * season] / whole
    torch.testing.assert_close(got, want)
    # one season of context: the profile is seasonal naive
    torch.testing.assert_close(seasonal_profile(x[:, -season:], season, horizon), seasonal_naive(x, season, horizon))


@settings(max_examples=25, deadline=None)
@given(season=st.integers(1, 6), extra=st.integers(1, 9), horizon=st.integers(1, 13), seed=st.integers(0, 99))
def test_seasonal_drift_against_a_loop(season, extra, horizon, seed):
    context = season + extra
    x = torch.tensor(np.random.default_rng(seed).normal(size=(2, context, 3)))
    got = seasonal_drift(x, season, horizon)
    diffs = [x[:, s] - x[:, s - season] for s in range(season, context)]
    drift = sum(diffs) / len(diffs)
    for t in range(horizon):  # the last value of step t's phase, plus one drift per season ahead
        want = x[:, context - season + t % season] + (t // season + 1) * drift
        torch.testing.assert_close(got[:, t], want)
    # a line is continued exactly
    line = torch.arange(context + horizon, dtype=torch.float64)[None, :, None] * 0.5 + 3.0
    torch.testing.assert_close(seasonal_drift(line[:, :context], season, horizon), line[:, context:])
    with pytest.raises(ValueError, match="longer than season"):
        seasonal_drift(x[:, :season], season, horizon)
    with pytest.raises(ValueError, match="kind='last' is invalid"):
        base_forecast(x, "last", season, horizon)


def test_choose_base_on_windows():
    rng = np.random.default_rng(0)
    t = np.arange(40 + 6 + 12)
    starts = np.arange(12)
    clean = np.sin(2 * np.pi * t / 4)
    windows = lambda s: (np.stack([s[i:i + 40] for i in starts])[..., None],  # noqa: E731
                         np.stack([s[i + 40:i + 46] for i in starts])[..., None])
    assert choose_base(*windows(clean + 0.01 * t), 4) == "drift"  # a trend: seasonal naive with drift
    assert choose_base(*windows(clean + rng.normal(0, 0.5, len(t))), 4) == "profile"  # noise averages out
    level = rng.normal(0, 1, len(t))
    assert choose_base(*windows(level), 4) == "mean"
    assert choose_base(*windows(level), 41) == "mean"  # a season longer than the context: only the mean


@pytest.mark.parametrize("name", sorted(SSM_FORECASTERS))
def test_zero_output_layer_returns_the_base(name):
    torch.manual_seed(0)
    net = FORECASTERS[name](12, 5, 2)
    with torch.no_grad():
        for layer in net.output_layers():
            layer.weight.zero_()
            layer.bias.zero_()
    x = torch.randn(3, 12, 2)
    torch.testing.assert_close(net(x), x.mean(1, keepdim=True).expand(-1, 5, -1))
    for kind in ("seasonal", "profile", "drift"):
        torch.testing.assert_close(SeasonalResidual(net, 4, kind)(x), base_forecast(x, kind, 4, 5))
    with pytest.raises(ValueError, match="kind='mean' is invalid"):
        SeasonalResidual(net, 4, "mean")


@needs_sktime
@pytest.mark.parametrize("context", [7, 30])
def test_dlinear_is_the_standard_definition(context):
    """sktime's DLinear network against the definition (Zeng et al. 2023), in float64: a moving average of 25
    over the context padded with 12 copies of its first and last values is the trend, the rest the seasonal
    part; out = W_t trend + b_t + W_s seasonal + b_s per variate, one (W, b) pair shared across variates."""
    torch.manual_seed(0)
    net = DLinear(context, 4, 3).double()
    x = torch.randn(2, context, 3, dtype=torch.float64)
    xn = x.numpy()
    padded = np.concatenate([np.repeat(xn[:, :1], 12, 1), xn, np.repeat(xn[:, -1:], 12, 1)], 1)
    trend = np.stack([padded[:, i:i + 25].mean(1) for i in range(context)], 1)
    lin = {n: (m.weight.detach().numpy(), m.bias.detach().numpy()) for n, m in net.named_modules()
           if isinstance(m, torch.nn.Linear)}
    (wt, bt), (ws, bs) = lin["net.Linear_Trend"], lin["net.Linear_Seasonal"]
    want = np.einsum("hc,bcv->bhv", wt, trend) + bt[:, None] + np.einsum("hc,bcv->bhv", ws, xn - trend) + bs[:, None]
    np.testing.assert_allclose(net(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="DLinear: x must be"):
        net(x[:, 1:])


@needs_sktime
def test_purge_keeps_validation_targets_out_of_training(monkeypatch):
    """On z = time index, the targets a training batch holds are time steps: without purge the training
    targets reach into the validation targets, with it they end before the first one."""
    from ssmkit.timeseries.intervals import GaussianHead

    z = np.arange(60, dtype=np.float32)[:, None]
    seen: list[float] = []
    loss = GaussianHead.loss

    def record(self, x, y, point="mse"):
        seen.append(float(y.max()))
        return loss(self, x, y, point)

    monkeypatch.setattr(GaussianHead, "loss", record)
    for purge in (False, True):
        seen.clear()
        cfg = TrainConfig(steps=1, baseline_steps=20, evals=1, base="mean", purge=purge)
        fit = train_forecaster("dlinear", z, 60, 10, 5, 0, cfg)
        first_val = float(fit.val_true.min())  # the first validation window's first target
        assert fit.base == "none" and first_val == 10 + 46 - round(0.15 * 46)  # 46 windows, the last 7 validate
        assert (max(seen) < first_val) if purge else (max(seen) >= first_val)


def test_keep_base_can_return_the_untrained_base():
    """On white noise nothing beats the window mean: with a zero-initialised output layer and the step-0 model
    as a checkpoint candidate, a forecaster trained at a harmful learning rate keeps the base exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = np.random.default_rng(0).normal(size=(120, 1)).astype(np.float32)
        cfg = TrainConfig(steps=4, evals=2, lr=5.0, base="mean", zero_init=True, keep_base=True)
        fit = train_forecaster("s4d", z, 120, 10, 3, 0, cfg)
    finally:
        torch.set_num_threads(threads)
    assert fit.base == "mean" and fit.step == 0
    np.testing.assert_allclose(fit.val_pred, np.broadcast_to(fit.val_pred[:, :1], fit.val_pred.shape))


def test_train_config_errors():
    with pytest.raises(ValueError, match="base='last' is invalid"):
        TrainConfig(base="last")
    with pytest.raises(ValueError, match="loss='l2' is invalid"):
        TrainConfig(loss="l2")
    with pytest.raises(ValueError, match="steps, batch_size"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="val_frac=1.0 is invalid"):
        TrainConfig(val_frac=1.0)

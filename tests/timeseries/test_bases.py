"""The forecast bases a neural correction is added to: the seasonal profile against a loop oracle, the
validation choice among the bases, the zero-initialised output layer that starts training at the base, and
TrainConfig's one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.timeseries.models import FORECASTERS, SeasonalResidual, seasonal_naive, seasonal_profile
from ssmkit.timeseries.protocol import TrainConfig, choose_base, train_forecaster


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


def test_choose_base_on_windows():
    rng = np.random.default_rng(0)
    t = np.arange(40 + 6 + 12)
    starts = np.arange(12)
    clean = np.sin(2 * np.pi * t / 4)
    windows = lambda s: (np.stack([s[i:i + 40] for i in starts])[..., None],  # noqa: E731
                         np.stack([s[i + 40:i + 46] for i in starts])[..., None])
    assert choose_base(*windows(clean + 0.01 * t), 4) == "seasonal"  # a trend: the last season is best
    assert choose_base(*windows(clean + rng.normal(0, 0.5, len(t))), 4) == "profile"  # noise averages out
    level = rng.normal(0, 1, len(t))
    assert choose_base(*windows(level), 4) == "mean"
    assert choose_base(*windows(level), 41) == "mean"  # a season longer than the context: only the mean


@pytest.mark.parametrize("name", sorted(FORECASTERS))
def test_zero_output_layer_returns_the_base(name):
    torch.manual_seed(0)
    net = FORECASTERS[name](12, 5, 2)
    with torch.no_grad():
        for layer in net.output_layers():
            layer.weight.zero_()
            layer.bias.zero_()
    x = torch.randn(3, 12, 2)
    if name != "dlinear":  # DLinear without a season adds no base
        torch.testing.assert_close(net(x), x.mean(1, keepdim=True).expand(-1, 5, -1))
    torch.testing.assert_close(SeasonalResidual(net, 4, profile=True)(x), seasonal_profile(x, 4, 5))


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

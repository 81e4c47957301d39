"""Gaussian prediction intervals: the mixture and coverage helpers, the calibration step, the validation choice
of the SSM ensemble, and the coverage of a trained S4D forecaster on a series with known noise."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ssmkit.timeseries.intervals import Z80, GaussianHead, coverage, mixture
from ssmkit.timeseries.models import DLinear
from ssmkit.timeseries.protocol import Fitted, TrainConfig, _choose, train_forecaster


def test_mixture_moments_against_sampling():
    rng = np.random.default_rng(0)
    means, sigmas = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, -3.0]]), np.array([[1.0, 0.5], [1.0, 2.0], [0.1, 1.0]])
    mu, sd = mixture(means, sigmas)
    k = rng.integers(0, 3, 400_000)
    draws = rng.normal(means[k], sigmas[k])  # (draws, 2): a sample from the equal-weight mixture
    np.testing.assert_allclose(mu, draws.mean(0), atol=0.02)
    np.testing.assert_allclose(sd, draws.std(0), rtol=0.01)
    m1, s1 = mixture(means[:1], sigmas[:1])  # one component is itself
    np.testing.assert_allclose(m1, means[0])
    np.testing.assert_allclose(s1, sigmas[0])
    with pytest.raises(ValueError, match="means"):
        mixture(means, sigmas[:2])


def test_coverage_counts_the_closed_interval():
    assert coverage(np.zeros(4), np.ones(4), np.array([0.0, 0.5, 1.0, 1.5])) == 0.75
    with pytest.raises(ValueError, match="coverage"):
        coverage(np.zeros(3), np.ones(4), np.zeros(4))


@pytest.mark.skipif(importlib.util.find_spec("sktime") is None, reason="DLinear is sktime's")
def test_calibration_makes_the_standardised_residual_unit():
    torch.manual_seed(0)
    head = GaussianHead(DLinear(12, 3, 1)).double()
    x, y = torch.randn(50, 12, 1, dtype=torch.float64), 3 * torch.randn(50, 3, 1, dtype=torch.float64)
    factor = head.calibrate(x, y)
    mean, sigma = head.dist(x)
    assert factor > 1 and float(((y - mean) / sigma).pow(2).mean().detach()) == pytest.approx(1.0)
    torch.testing.assert_close(head(x), head.inner(x))  # the head leaves the point forecast alone


def test_choice_is_the_lowest_validation_mse():
    true = np.zeros((4, 2, 1))

    def fit(bias: float) -> Fitted:
        return Fitted(None, true + bias, true)  # type: ignore[arg-type]

    assert _choose({"a": [fit(1.0), fit(1.0)], "b": [fit(0.5), fit(0.3)]}) == ("b", ["b"])
    # errors of opposite sign cancel in the average of all variants
    assert _choose({"a": [fit(1.0)], "b": [fit(-0.9)]}) == ("all", ["a", "b"])
    assert _choose({"a": [fit(0.2)]}) == ("a", ["a"])


def test_one_se_keeps_all_unless_a_variant_wins_clearly():
    true = np.zeros((4, 2, 1))

    def fit(per_window: list[float]) -> Fitted:
        return Fitted(None, true + np.array(per_window)[:, None, None], true)  # type: ignore[arg-type]

    b = [fit([0.3] * 4)]
    # a beats 'all' on average (0.040 vs 0.0475) but loses on one window: within one standard error
    noisy = {"a": [fit([0.0, 0.4, 0.0, 0.0])], "b": b}
    assert _choose(noisy) == ("a", ["a"])
    assert _choose(noisy, one_se=True) == ("all", ["a", "b"])
    # a beats 'all' by the same amount on every window: a clear win
    clear = {"a": [fit([0.0, 0.2, 0.0, 0.0])], "b": b}
    assert _choose(clear, one_se=True) == ("a", ["a"])


@pytest.fixture
def one_thread():
    """One torch thread (two competing threads ran this training ~50x slower on the loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_s4d_intervals_cover_a_series_with_known_noise(one_thread):
    """y = 2 sin(2 pi t / 12) + N(0, 0.5^2): the 80% interval of a trained S4D forecaster covers ~80% of
    unseen windows, and its width matches the noise (it cannot be narrower than the noise and stay calibrated)."""
    torch.manual_seed(0)
    t = np.arange(900)
    noise = 0.5
    y = 2 * np.sin(2 * np.pi * t / 12) + np.random.default_rng(1).normal(0, noise, len(t))
    mu, sd = y[:600].mean(), y[:600].std()
    z = ((y - mu) / sd).astype(np.float32)[:, None]
    fit = train_forecaster("s4d", z, 600, 24, 6, 0, TrainConfig(steps=100, evals=5), season=12)
    starts = np.arange(624, 900 - 6, 3)
    x = torch.tensor(np.stack([z[s - 24:s] for s in starts]))
    with torch.no_grad():
        mean, sigma = (v[:, :, 0].double().numpy() * sd for v in fit.model.dist(x))
    mean = mean + mu
    actual = np.stack([y[s:s + 6] for s in starts])
    cov = coverage(mean - Z80 * sigma, mean + Z80 * sigma, actual)
    assert 0.7 <= cov <= 0.9, cov
    assert 0.9 * noise <= np.median(sigma) <= 1.5 * noise, np.median(sigma)

"""The shipped suites load offline with the expected shapes; the library baselines run in the harness."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ssmkit.timeseries.baselines import classify_baseline, seasonal_naive, stat_forecast
from ssmkit.timeseries.datasets import CLASSIFY_SUITE, FORECAST_SUITE, load_classification, load_series
from ssmkit.timeseries.protocol import origins

HAVE_FORECAST_DATA = all(importlib.util.find_spec(m) for m in ("pmdarima", "statsmodels"))
HAVE_UCR = importlib.util.find_spec("sktime") is not None or importlib.util.find_spec("aeon") is not None
LENGTHS = {"taylor": 4032, "wineind": 176, "woolyrnq": 119, "lynx": 114, "airpassengers": 144, "nile": 100,
           "co2": 526, "sunspots": 309, "elnino": 732, "macrodata": 203}


@pytest.mark.skipif(not HAVE_FORECAST_DATA, reason="pmdarima and statsmodels are needed (pip install ssmkit[data])")
@pytest.mark.parametrize("name", sorted(FORECAST_SUITE))
def test_forecast_suite_loads_offline(name):
    s = load_series(name)
    assert s.values.shape[0] == LENGTHS[name] and np.isfinite(s.values).all()
    assert s.values.shape[1] == (7 if name == "macrodata" else 1)
    first = origins(len(s.values), s.horizons)[0]
    assert first - s.context - max(s.horizons) >= 16  # room for training windows
    assert s.season <= s.context


def test_unknown_series_is_one_line():
    with pytest.raises(ValueError, match="dataset='ett' is not in the forecasting suite"):
        load_series("ett")


@pytest.mark.skipif(not HAVE_UCR, reason="sktime (or aeon) ships the UCR sets: pip install sktime")
def test_classification_suite_loads_offline():
    assert len(CLASSIFY_SUITE) >= 6
    (xtr, ytr), (xte, yte) = load_classification("ItalyPowerDemand")
    assert xtr.shape == (67, 1, 24) and xte.shape == (1029, 1, 24) and set(ytr) == {"1", "2"}
    (xtr, _), _ = load_classification("BasicMotions")
    assert xtr.shape == (40, 6, 100)


@pytest.mark.skipif(importlib.util.find_spec("sktime") is None, reason="sktime ships JapaneseVowels")
def test_japanese_vowels_is_padded_with_each_case_last_value():
    (xtr, ytr), (xte, yte) = load_classification("JapaneseVowels")
    assert xtr.shape == (270, 12, 29) and xte.shape == (370, 12, 29) and len(set(ytr)) == 9
    assert np.isfinite(xtr).all() and np.isfinite(xte).all()
    # the shortest training case (7 steps in the archive) repeats its last frame to the end
    flat = (np.diff(xtr, axis=2) == 0).all(axis=1)  # (cases, 28): no channel changes at that step
    run = flat[:, ::-1].cumprod(1).sum(1)  # trailing steps with no change
    assert run.max() == 29 - 7


@pytest.mark.skipif(not HAVE_UCR, reason="sktime (or aeon) ships the UCR sets: pip install sktime")
@pytest.mark.skipif(importlib.util.find_spec("sktime") is None, reason="the baselines use sktime")
def test_dtw_baseline_on_a_shipped_set():
    train, test = load_classification("ItalyPowerDemand")
    acc = classify_baseline("dtw_1nn", train, (test[0][:100], test[1][:100]))
    assert 0.85 <= acc <= 1.0  # the archive: 95.0% for full-window 1-NN DTW on the whole test split


def test_seasonal_naive_and_stat_baselines():
    np.testing.assert_array_equal(seasonal_naive(np.arange(10.0), 3, 5).mean, [7, 8, 9, 7, 8])
    with pytest.raises(ValueError, match="name='prophet' is invalid"):
        stat_forecast("prophet", np.arange(10.0), 1, 2)
    pytest.importorskip("statsmodels", reason="ETS and ARIMA come from statsmodels")
    t = np.arange(60.0)
    y = 10 + 0.5 * t + 3 * np.sin(2 * np.pi * t / 4)
    for name in ("ets", "arima"):
        f = stat_forecast(name, y[:52], 4, 8)
        assert f.mean.shape == (8,)
        np.testing.assert_allclose(f.mean, y[52:], atol=0.5)  # a clean trend + season is easy
    f = stat_forecast("arima", y[:52], 4, 8)
    assert f.lower is not None and np.all(f.lower <= f.mean) and np.all(f.mean <= f.upper)

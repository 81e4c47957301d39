"""Baselines from their libraries: seasonal naive, ETS and ARIMA (statsmodels) for forecasting; MiniRocket and
1-NN DTW (sktime) for classification. statsmodels and sktime are imported inside the functions."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.base import require_module

STAT_FORECASTERS = ("seasonal_naive", "ets", "arima")
CLASSIFIERS = ("minirocket", "dtw_1nn")


@dataclass
class PointForecast:
    """``mean`` (steps,); ``lower``/``upper`` (steps,) bound an 80% interval, or are None."""

    mean: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread while statsmodels fits: its many small BLAS calls ran ~15x slower with two threads
    competing on a loaded 2-core machine. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def seasonal_naive(history: np.ndarray, season: int, steps: int) -> PointForecast:
    """The last ``season`` values repeated."""
    if len(history) < season:
        raise ValueError(f"seasonal_naive: need at least season={season} points, got {len(history)}")
    last = history[-season:]
    return PointForecast(last[np.arange(steps) % season].astype(np.float64))


def ets(history: np.ndarray, season: int, steps: int) -> PointForecast:
    """statsmodels Holt-Winters: additive damped trend, additive season when there are two full seasons."""
    hw = require_module("statsmodels.tsa.holtwinters", task="ets baseline", pip="statsmodels")
    seasonal = season > 1 and len(history) >= 2 * season
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore")
        fit = hw.ExponentialSmoothing(history, trend="add", damped_trend=True,
                                      seasonal="add" if seasonal else None,
                                      seasonal_periods=season if seasonal else None,
                                      initialization_method="estimated").fit()
    return PointForecast(np.asarray(fit.forecast(steps), dtype=np.float64))


def arima(history: np.ndarray, season: int, steps: int) -> PointForecast:
    """statsmodels SARIMAX, the lower-AIC of two orders, with an 80% interval.

    season 2..24: (1,1,1)x(0,1,1,season) or (1,0,1)x(0,1,1,season) with a constant; season 1: (2,1,1) or
    (2,0,1) with a constant. Longer seasons (e.g. 48 half-hours) make the state space too large: the series is
    seasonally differenced first, (2,0,1) is fitted to the differences, and the point forecast is integrated
    back (no interval then).
    """
    sarimax = require_module("statsmodels.tsa.statespace.sarimax", task="arima baseline", pip="statsmodels")
    y = np.asarray(history, dtype=np.float64)
    manual = season > 24
    if manual:
        if len(y) <= 2 * season:
            raise ValueError(f"arima: need more than 2*season={2 * season} points, got {len(y)}")
        y = y[season:] - y[:-season]
        candidates = [((2, 0, 1), (0, 0, 0, 0), "c")]
    elif season > 1:
        candidates = [((1, 1, 1), (0, 1, 1, season), "n"), ((1, 0, 1), (0, 1, 1, season), "c")]
    else:
        candidates = [((2, 1, 1), (0, 0, 0, 0), "n"), ((2, 0, 1), (0, 0, 0, 0), "c")]
    best = None
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore")
        for order, seasonal, trend in candidates:
            try:
                fit = sarimax.SARIMAX(y, order=order, seasonal_order=seasonal, trend=trend).fit(disp=False)
            except (np.linalg.LinAlgError, ValueError):
                continue
            if np.isfinite(fit.aic) and (best is None or fit.aic < best.aic):
                best = fit
        if best is None:
            raise ValueError("arima: no candidate order could be fitted")
        pred = best.get_forecast(steps)
    mean = np.asarray(pred.predicted_mean, dtype=np.float64)
    if manual:
        out = np.concatenate([history[-season:], np.zeros(steps)])
        for t in range(steps):
            out[season + t] = out[t] + mean[t]
        return PointForecast(out[season:])
    ci = np.asarray(pred.conf_int(alpha=0.2), dtype=np.float64)
    return PointForecast(mean, ci[:, 0], ci[:, 1])


def stat_forecast(name: str, history: np.ndarray, season: int, steps: int) -> PointForecast:
    """Dispatch to :func:`seasonal_naive`, :func:`ets` or :func:`arima` by name."""
    fns = {"seasonal_naive": seasonal_naive, "ets": ets, "arima": arima}
    if name not in fns:
        raise ValueError(f"stat_forecast: name={name!r} is invalid: expected one of {', '.join(fns)}")
    return fns[name](np.asarray(history, dtype=np.float64), season, steps)


def classify_baseline(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      seed: int = 0) -> float:
    """Test accuracy of sktime's MiniRocket (RocketClassifier, 10,000 kernels) or 1-NN DTW with a Sakoe-Chiba
    window of 10% of the length (full-window DTW on ACSF1's 1460 steps costs minutes).

    X arrays are (cases, channels, length), labels str.
    """
    if name == "minirocket":
        mod = require_module("sktime.classification.kernel_based", task="minirocket baseline", pip="sktime")
        clf = mod.RocketClassifier(rocket_transform="minirocket", random_state=seed)
    elif name == "dtw_1nn":
        mod = require_module("sktime.classification.distance_based", task="dtw baseline", pip="sktime")
        clf = mod.KNeighborsTimeSeriesClassifier(n_neighbors=1, distance="dtw", distance_params={"window": 0.1})
    else:
        raise ValueError(f"classify_baseline: name={name!r} is invalid: expected one of {', '.join(CLASSIFIERS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(train[0], train[1])
        pred = clf.predict(test[0])
    return float(np.mean(np.asarray(pred).astype(str) == test[1]))

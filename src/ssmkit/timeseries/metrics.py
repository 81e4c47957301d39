"""Forecast and ranking metrics, on plain numpy arrays.

MASE and sMAPE are computed on the original scale of the target, MSE and MAE on its z-normalised scale (the
caller passes normalised arrays for those).
"""

from __future__ import annotations

import numpy as np


def _pair(forecast: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, a = np.asarray(forecast, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if f.shape != a.shape or f.size == 0:
        raise ValueError(f"forecast has shape {f.shape} but actual {a.shape}; expected equal non-empty shapes")
    return f, a


def mase_scale(history: np.ndarray, season: int) -> float:
    """Mean absolute seasonal difference of the in-sample history: mean |y_t - y_{t-season}|."""
    h = np.asarray(history, dtype=np.float64)
    if season < 1 or len(h) <= season:
        raise ValueError(f"mase: need a history longer than season={season}, got {len(h)} points")
    scale = float(np.abs(h[season:] - h[:-season]).mean())
    if scale == 0.0:
        raise ValueError(f"mase: the history is constant at lag season={season}; the MASE scale is zero")
    return scale


def mase(forecast: np.ndarray, actual: np.ndarray, history: np.ndarray, season: int) -> float:
    """Mean absolute error scaled by the in-sample seasonal-naive error (< 1 beats seasonal naive in-sample)."""
    f, a = _pair(forecast, actual)
    return float(np.abs(f - a).mean() / mase_scale(history, season))


def smape(forecast: np.ndarray, actual: np.ndarray) -> float:
    """Symmetric MAPE in percent, 200 |f - a| / (|f| + |a|), with 0/0 counted as 0."""
    f, a = _pair(forecast, actual)
    den = np.abs(f) + np.abs(a)
    ratio = np.divide(2.0 * np.abs(f - a), den, out=np.zeros_like(den), where=den > 0)
    return float(100.0 * ratio.mean())


def mse(forecast: np.ndarray, actual: np.ndarray) -> float:
    f, a = _pair(forecast, actual)
    return float(((f - a) ** 2).mean())


def mae(forecast: np.ndarray, actual: np.ndarray) -> float:
    f, a = _pair(forecast, actual)
    return float(np.abs(f - a).mean())


def ranks(scores: np.ndarray, higher_is_better: bool = False) -> np.ndarray:
    """Rank of each column within each row (1 = best), ties sharing their mean rank; scores (rows, models)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"ranks: scores must be (rows, models), got shape {s.shape}")
    s = -s if higher_is_better else s
    out = np.empty_like(s)
    for i, row in enumerate(s):
        order = np.argsort(row, kind="stable")
        r = np.empty(len(row))
        r[order] = np.arange(1, len(row) + 1)
        for v in np.unique(row):
            tie = row == v
            r[tie] = r[tie].mean()
        out[i] = r
    return out

"""The benchmark suites: forecasting series shipped by pmdarima/statsmodels, UCR/UEA sets shipped by sktime.

Nothing is downloaded: every loader reads data files installed with its package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..data.base import require_module


@dataclass(frozen=True)
class SeriesSpec:
    """One forecasting data set and its protocol settings.

    ``season`` is the period of the seasonal-naive baseline and of the MASE scale (1 = naive, for annual data);
    ``horizons`` are scored at every origin; ``context`` is the window the neural models read.
    """

    name: str
    source: str
    season: int
    horizons: tuple[int, ...]
    context: int
    loader: Callable[[], tuple[np.ndarray, list[str]]]  # -> (values (time, variates) float64, names); target first


@dataclass
class Series:
    """A loaded series: ``values`` (time, variates) float64 with the target in column 0."""

    name: str
    values: np.ndarray
    columns: list[str]
    season: int
    horizons: tuple[int, ...]
    context: int

    @property
    def target(self) -> np.ndarray:
        return self.values[:, 0]


def _pmdarima(name: str) -> Callable[[], tuple[np.ndarray, list[str]]]:
    def load() -> tuple[np.ndarray, list[str]]:
        datasets = require_module("pmdarima.datasets", task=f"timeseries {name}", pip="pmdarima")
        return np.asarray(getattr(datasets, f"load_{name}")(), dtype=np.float64)[:, None], [name]
    return load


def _statsmodels(name: str) -> Callable[[], tuple[np.ndarray, list[str]]]:
    def load() -> tuple[np.ndarray, list[str]]:
        sm = require_module("statsmodels.api", task=f"timeseries {name}", pip="statsmodels")
        frame = getattr(sm.datasets, name).load_pandas().data
        if name == "nile":
            return frame["volume"].to_numpy(np.float64)[:, None], ["volume"]
        if name == "sunspots":
            return frame["SUNACTIVITY"].to_numpy(np.float64)[:, None], ["SUNACTIVITY"]
        if name == "co2":  # weekly, 59 weeks missing: linear in time across the gaps, then monthly means
            monthly = frame["co2"].interpolate(method="time").resample("MS").mean()
            return monthly.to_numpy(np.float64)[:, None], ["co2"]
        if name == "elnino":  # one row per year, one column per month -> the monthly series
            return frame.drop(columns="YEAR").to_numpy(np.float64).reshape(-1, 1), ["temperature"]
        if name == "macrodata":  # target unemp, with the other quarterly indicators as extra variates
            cols = ["unemp", "realgdp", "realcons", "realinv", "cpi", "tbilrate", "infl"]
            return frame[cols].to_numpy(np.float64), cols
        raise KeyError(name)
    return load


FORECAST_SUITE: dict[str, SeriesSpec] = {s.name: s for s in [
    SeriesSpec("taylor", "pmdarima", 48, (48, 96), 192, _pmdarima("taylor")),
    SeriesSpec("wineind", "pmdarima", 12, (6, 12), 36, _pmdarima("wineind")),
    SeriesSpec("woolyrnq", "pmdarima", 4, (4, 8), 16, _pmdarima("woolyrnq")),
    SeriesSpec("lynx", "pmdarima", 1, (5, 10), 30, _pmdarima("lynx")),
    SeriesSpec("airpassengers", "pmdarima", 12, (6, 12), 36, _pmdarima("airpassengers")),
    SeriesSpec("nile", "statsmodels", 1, (5, 10), 20, _statsmodels("nile")),
    SeriesSpec("co2", "statsmodels", 12, (12, 24), 48, _statsmodels("co2")),
    SeriesSpec("sunspots", "statsmodels", 1, (5, 10), 44, _statsmodels("sunspots")),
    SeriesSpec("elnino", "statsmodels", 12, (6, 12), 48, _statsmodels("elnino")),
    SeriesSpec("macrodata", "statsmodels", 4, (4, 8), 16, _statsmodels("macrodata")),
]}

#: UCR/UEA sets shipped inside sktime's wheel (BasicMotions 6 channels, JapaneseVowels 12 and unequal lengths)
CLASSIFY_SUITE: tuple[str, ...] = ("GunPoint", "ItalyPowerDemand", "ArrowHead", "BasicMotions", "OSULeaf", "ACSF1",
                                   "JapaneseVowels")
#: unequal-length sets, padded at the end by repeating each case's last value (see :func:`load_padded`)
PADDED = ("JapaneseVowels",)


def load_series(name: str) -> Series:
    """Load one forecasting set of :data:`FORECAST_SUITE` by name."""
    if name not in FORECAST_SUITE:
        raise ValueError(f"timeseries: dataset={name!r} is not in the forecasting suite "
                         f"({', '.join(FORECAST_SUITE)})")
    spec = FORECAST_SUITE[name]
    values, columns = spec.loader()
    if not np.isfinite(values).all():
        raise ValueError(f"timeseries {name}: the series holds non-finite values")
    return Series(name, values, columns, spec.season, spec.horizons, spec.context)


def load_classification(name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((X_train, y_train), (X_test, y_test)) with X (cases, channels, length) float64 and y str labels.

    Uses :func:`ssmkit.data.ucr.load_ucr_split` (aeon, else sktime, both offline); the sets of :data:`PADDED`
    go through :func:`load_padded`.
    """
    from ..data.ucr import load_ucr_split

    if name in PADDED:
        return load_padded(name)

    return load_ucr_split(name, "train"), load_ucr_split(name, "test")


def pad_cases(cases: list[np.ndarray], length: int) -> np.ndarray:
    """(channels, length_i) arrays -> (cases, channels, length), each padded at the end with its last value."""
    if any(c.shape[1] < 1 or c.shape[1] > length for c in cases):
        raise ValueError(f"pad_cases: every case needs 1..{length} steps")
    return np.stack([np.concatenate([c, np.repeat(c[:, -1:], length - c.shape[1], 1)], 1) for c in cases])


def load_padded(name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """An unequal-length set shipped by sktime, both splits padded to the longest case of either split."""
    datasets = require_module("sktime.datasets", task=f"timeseries {name}", pip="sktime")
    splits = []
    for split in ("train", "test"):
        frame, y = datasets.load_UCR_UEA_dataset(name, split=split, return_type="nested_univ")
        cases = [np.stack([np.asarray(frame.iloc[i, j], dtype=np.float64) for j in range(frame.shape[1])])
                 for i in range(len(frame))]
        splits.append((cases, np.asarray(y).astype(str)))
    length = max(c.shape[1] for cases, _ in splits for c in cases)
    return tuple((pad_cases(cases, length), y) for cases, y in splits)  # type: ignore[return-value]

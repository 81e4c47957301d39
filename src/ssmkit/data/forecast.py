"""Forecasting windows (context -> horizon) on pmdarima's Taylor demand series or a CSV column."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import Tensor

from .base import Task, require_module
from .params import TaskParams, param


@dataclass(frozen=True, kw_only=True)
class ForecastParams(TaskParams):
    source: str = param("taylor", "'taylor' (pmdarima's half-hourly demand, 4032 points) or 'csv'",
                        choices=("taylor", "csv"))
    path: str = param("", "CSV file (source='csv')")
    column: str = param("", "CSV column(s): header names or 0-based indices, comma-separated ('' = the only one)")
    context: int = param(192, "input window length", ge=1)
    horizon: int = param(48, "steps to forecast", ge=1)
    season: int = param(48, "season length of the seasonal-naive baseline (48 = a day of half-hours)", ge=1)
    stride: int = param(1, "step between consecutive window starts", ge=1)
    val_fraction: float = param(0.1, "share of the series (after the training part) for validation", gt=0.0, lt=1.0)
    test_fraction: float = param(0.2, "final share of the series for testing", gt=0.0, lt=1.0)
    normalize: bool = param(True, "standardise by the training part's mean and std (metrics on that scale)")

    def validate(self) -> None:
        if self.source == "csv" and not self.path:
            self.fail("path", "source='csv' needs a CSV file")
        if self.source == "taylor" and (self.path or self.column):
            self.fail("path" if self.path else "column", "only used with source='csv'")
        if self.season > self.context:
            self.fail("season", f"the seasonal-naive baseline needs season <= context={self.context}")
        if self.val_fraction + self.test_fraction >= 1.0:
            self.fail("test_fraction", f"need val_fraction + test_fraction < 1 (val_fraction={self.val_fraction})")


def read_csv_columns(path: str | Path, column: str) -> tuple[np.ndarray, list[str]]:
    """Numeric columns of a CSV file -> (values (rows, columns) float64, column names).

    ``column``: comma-separated header names or 0-based indices ('' selects the only column). The first row is
    the header when a column is selected by name or when its selected cells are not all numbers.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"forecast: {path} holds no rows")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    width = len(rows[0])
    first = [c.strip() for c in rows[0]]
    specs = [c.strip() for c in column.split(",")] if column else []
    if not specs:
        if width != 1:
            raise ValueError(f"forecast: column='' is invalid: {path} has {width} columns ({', '.join(first)}); "
                             "name one or more")
        specs = ["0"]
    cols, named = [], False
    for spec in specs:
        if spec in first and not numeric(spec):
            cols.append(first.index(spec))
            named = True
        elif spec.isdigit() and int(spec) < width:
            cols.append(int(spec))
        else:
            raise ValueError(f"forecast: column={spec!r} is invalid: not a header name or index of "
                             f"{', '.join(first)}")
    has_header = named or not all(numeric(first[c]) for c in cols)
    header = first if has_header else [str(i) for i in range(width)]
    body = rows[1:] if has_header else rows
    values = np.empty((len(body), len(cols)), dtype=np.float64)
    for i, row in enumerate(body):
        for j, c in enumerate(cols):
            try:
                values[i, j] = float(row[c])
            except (ValueError, IndexError):
                line = i + 1 + has_header
                raise ValueError(f"forecast: {path} row {line} (counting the header), column {header[c]!r}: "
                                 f"{row[c] if c < len(row) else '(missing)'!r} is not a number") from None
    return values, [header[c] for c in cols]


class Forecast(Task):
    """Windowed forecasting: inputs (batch, context, d) -> labels (batch, horizon, d), d = number of columns.

    The series is split by time: the first part trains, then ``val_fraction``, then ``test_fraction``; a window
    belongs to the split holding its whole horizon (its context may reach back into the previous split).

    Metric ``mse`` (also ``mae``) on the normalised scale, lower is better. Every batch also scores the
    seasonal-naive baseline (repeat the last ``season`` steps of the context): ``naive_mse``, ``naive_mae`` and
    ``relative_mse`` = mse / naive_mse (< 1 beats the baseline). There is no fixed chance level.
    """

    name: ClassVar[str] = "forecast"
    description: ClassVar[str] = "forecasting windows on the Taylor demand series or a CSV column, vs seasonal naive"
    kind: ClassVar[str] = "forecast"
    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    Params = ForecastParams

    def _setup(self) -> None:
        p = self.params
        if p.source == "taylor":
            datasets = require_module("pmdarima.datasets", task=self.name, pip="pmdarima")
            series = np.asarray(datasets.load_taylor(), dtype=np.float64)[:, None]
            self.columns = ["taylor"]
        else:
            series, self.columns = read_csv_columns(p.path, p.column)
        if not np.isfinite(series).all():
            raise ValueError("forecast: the series holds non-finite values")
        n = len(series)
        n_test, n_val = int(n * p.test_fraction), int(n * p.val_fraction)
        n_train = n - n_val - n_test
        self.mean, self.std = np.zeros(series.shape[1]), np.ones(series.shape[1])
        if p.normalize:
            mean, std = series[:n_train].mean(0), series[:n_train].std(0)
            series = (series - mean) / np.where(std > 0, std, 1.0)
            self.mean, self.std = mean, std
        self.series = series.astype(np.float32)
        bounds = {"train": (p.context, n_train), "val": (max(n_train, p.context), n_train + n_val),
                  "test": (max(n_train + n_val, p.context), n)}
        self._starts = {}
        for split, (lo, hi) in bounds.items():
            starts = np.arange(lo, hi - p.horizon + 1, p.stride)
            if len(starts) == 0:
                raise ValueError(
                    f"forecast: split {split!r} has no window: {hi - lo} points for context={p.context} + "
                    f"horizon={p.horizon} (series of {n} points); shorten them or change the fractions"
                )
            self._starts[split] = starts
        self.d_input = self.d_output = series.shape[1]
        self.horizon = p.horizon
        self.max_length = p.context

    def num_examples(self, split: str) -> int:
        return len(self._starts[self.check_split(split)])

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        p = self.params
        s = self._starts[split][indices]
        ctx = s[:, None] + np.arange(-p.context, 0)
        hor = s[:, None] + np.arange(p.horizon)
        return {"inputs": self.series[ctx], "labels": self.series[hor]}

    def seasonal_naive(self, inputs: Tensor) -> Tensor:
        """Baseline forecast (batch, horizon, d): the last ``season`` context steps repeated."""
        p = self.params
        idx = p.context - p.season + (np.arange(p.horizon) % p.season)
        return inputs[:, idx]

    def _metric_sums(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        sums = super()._metric_sums(outputs, batch)
        err = self.seasonal_naive(batch["inputs"]).float() - batch["labels"].float()
        n = float(err.numel())
        sums["naive_mse"] = (float((err**2).sum()), n)
        sums["naive_mae"] = (float(err.abs().sum()), n)
        return sums

    def _derived(self, metrics: dict[str, float]) -> dict[str, float]:
        if metrics.get("naive_mse"):
            metrics["relative_mse"] = metrics["mse"] / metrics["naive_mse"]
        return metrics

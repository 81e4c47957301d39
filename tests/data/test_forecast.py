"""Forecast windows on a CSV the test writes; the seasonal-naive baseline; pmdarima's Taylor series if installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ssmkit.data import get_task
from ssmkit.data.forecast import read_csv_columns


def write_csv(path, n=400, period=24, header=True, noise=0.0):
    rng = np.random.default_rng(0)
    t = np.arange(n)
    a = np.sin(2 * np.pi * t / period) * 10 + 50 + noise * rng.standard_normal(n)
    b = np.cos(2 * np.pi * t / period) + t * 0.01
    rows = [f"2020-01-01T{i:05d},{float(x)!r},{float(y)!r}" for i, (x, y) in enumerate(zip(a, b, strict=True))]
    path.write_text(("date,load,other\n" if header else "") + "\n".join(rows) + "\n")
    return np.stack([a, b], 1)


def test_windows_are_contiguous_slices_split_by_time(tmp_path):
    series = write_csv(tmp_path / "s.csv")
    task = get_task("forecast", source="csv", path=str(tmp_path / "s.csv"), column="load,other", context=48,
                    horizon=12, season=24, stride=5, normalize=False)
    assert (task.d_input, task.d_output, task.horizon, task.max_length, task.kind) == (2, 2, 12, 48, "forecast")
    n_test, n_val = int(400 * 0.2), int(400 * 0.1)
    n_train = 400 - n_val - n_test
    for split, (lo, hi) in {"train": (48, n_train), "val": (n_train, n_train + n_val),
                            "test": (n_train + n_val, 400)}.items():
        batches = list(task.batches(split, 7, shuffle=False))
        inputs = torch.cat([b["inputs"] for b in batches]).numpy()
        labels = torch.cat([b["labels"] for b in batches]).numpy()
        starts = np.arange(lo, hi - 12 + 1, 5)
        assert len(inputs) == len(starts) == task.num_examples(split)
        assert inputs.shape[1:] == (48, 2) and labels.shape[1:] == (12, 2)
        for s, x, y in zip(starts, inputs, labels, strict=True):
            np.testing.assert_allclose(x, series[s - 48 : s], rtol=1e-6)
            np.testing.assert_allclose(y, series[s : s + 12], rtol=1e-6)
            assert lo <= s and s + 12 <= hi  # the horizon lies inside its split


def test_metrics_and_seasonal_naive(tmp_path):
    write_csv(tmp_path / "s.csv", noise=0.0)
    task = get_task("forecast", source="csv", path=str(tmp_path / "s.csv"), column="1", context=48, horizon=30,
                    season=24)
    batch = task.sample(16, seed=0)
    perfect = task.evaluate(batch["labels"].clone(), batch)
    assert perfect["mse"] == 0.0 and perfect["mae"] == 0.0
    # the series is exactly periodic with period 24: the seasonal-naive forecast is exact too
    assert perfect["naive_mse"] < 1e-10
    naive = task.seasonal_naive(batch["inputs"])
    torch.testing.assert_close(naive, batch["labels"], atol=1e-5, rtol=0)
    zeros = torch.zeros_like(batch["labels"])
    m = task.evaluate(zeros, batch)
    assert m["mse"] == pytest.approx(float((batch["labels"] ** 2).mean()), rel=1e-5)
    assert m["mae"] == pytest.approx(float(batch["labels"].abs().mean()), rel=1e-5)
    assert task.loss(zeros.requires_grad_(), batch).item() == pytest.approx(m["mse"], rel=1e-5)
    with pytest.raises(ValueError, match=r"outputs must have shape \(16, 30, 1\)"):
        task.evaluate(zeros[:, :5], batch)
    # wrong season: the baseline is no longer exact
    off = get_task("forecast", source="csv", path=str(tmp_path / "s.csv"), column="load", context=48, horizon=30,
                   season=20)
    b2 = off.sample(16, seed=0)
    assert off.evaluate(b2["labels"], b2)["naive_mse"] > 0.1
    assert off.evaluate(b2["labels"], b2)["relative_mse"] == 0.0


def test_normalisation_uses_training_statistics(tmp_path):
    series = write_csv(tmp_path / "s.csv")
    task = get_task("forecast", source="csv", path=str(tmp_path / "s.csv"), column="load", context=24, horizon=4,
                    season=24)
    n_train = 400 - 40 - 80
    np.testing.assert_allclose(task.series[:, 0], (series[:, 0] - series[:n_train, 0].mean())
                               / series[:n_train, 0].std(), rtol=1e-4, atol=1e-5)


def test_csv_parsing(tmp_path):
    write_csv(tmp_path / "h.csv", n=30, header=True)
    values, names = read_csv_columns(tmp_path / "h.csv", "other")
    assert names == ["other"] and values.shape == (30, 1)
    series = write_csv(tmp_path / "n.csv", n=30, header=False)
    values, names = read_csv_columns(tmp_path / "n.csv", "1,2")
    np.testing.assert_allclose(values, series)
    with pytest.raises(ValueError, match=r"column='' is invalid: .* has 3 columns \(date, load, other\)"):
        read_csv_columns(tmp_path / "h.csv", "")
    with pytest.raises(ValueError, match="column='price' is invalid"):
        read_csv_columns(tmp_path / "h.csv", "price")
    with pytest.raises(ValueError, match=r"row 2 \(counting the header\), column 'date': '2020-01-01T00000' is not"):
        read_csv_columns(tmp_path / "h.csv", "date")
    (tmp_path / "one.csv").write_text("1\n2\n3\n")
    assert read_csv_columns(tmp_path / "one.csv", "")[0].ravel().tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="split 'val' has no window"):
        get_task("forecast", source="csv", path=str(tmp_path / "h.csv"), column="load", context=4, horizon=8,
                 season=4)


@pytest.mark.skipif(importlib.util.find_spec("pmdarima") is None, reason="pmdarima is not installed")
def test_taylor_series():
    task = get_task("forecast", context=336, horizon=48, season=336)
    assert task.series.shape == (4032, 1)
    batch = next(task.batches("test", 32))
    m = task.evaluate(task.seasonal_naive(batch["inputs"]), batch)
    assert m["mse"] == m["naive_mse"] and 0 < m["naive_mse"] < 1.0  # weekly naive is a decent forecast

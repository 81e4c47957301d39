"""``ssmkit forecast`` end to end on a tiny CSV, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch

from ssmkit.cli import main
from ssmkit.cli.forecast import MODELS
from ssmkit.timeseries.models import FORECASTERS


@pytest.fixture(autouse=True)
def _restore_threads():
    """``ssmkit forecast`` limits torch and BLAS to --threads; give the other tests of this process theirs back."""
    threads = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(limits=None):  # restores the limits it found on exit
            yield
    torch.set_num_threads(threads)


def test_model_names_match():
    assert set(MODELS) == set(FORECASTERS)


@pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None, reason="ETS and ARIMA need statsmodels")
@pytest.mark.skipif(importlib.util.find_spec("sktime") is None, reason="the DLinear baseline is sktime's")
def test_forecast_end_to_end(tmp_path, capsys):
    t = np.arange(120)
    y = 20 + 0.05 * t + 2 * np.sin(2 * np.pi * t / 4) + np.random.default_rng(0).normal(0, 0.2, 120)
    start = datetime(2000, 1, 1)
    rows = [f"{(start + timedelta(days=7 * i)).date()},{v:.4f},{i % 3}" for i, v in enumerate(y)]
    csv = tmp_path / "s.csv"
    csv.write_text("date,load,aux\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["forecast", "--data", str(csv), "--target", "load", "--horizon", "4", "--season", "4",
                 "--steps", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "spacetime@4" in printed and "lowest mean MASE" in printed
    for f in ("report.md", "metrics.json", "forecast.png", "intervals.png"):
        assert (out / f).stat().st_size > 0, f
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    models = {r["model"] for r in rows}
    assert models == {"spacetime", "seasonal_naive", "ets", "arima", "dlinear"}
    assert {r["horizon"] for r in rows} == {2, 4} and len({r["origin"] for r in rows}) == 5
    assert all(np.isfinite(r["mase"]) and r["mase"] > 0 for r in rows)
    # the neural model and ARIMA carry 80% intervals; seasonal naive and ETS do not
    assert all(0 <= r["cov80"] <= 1 for r in rows if r["model"] in ("spacetime", "arima"))
    assert all(r["cov80"] is None for r in rows if r["model"] in ("seasonal_naive", "ets"))
    assert "spacetime's is its calibrated Gaussian head" in (out / "report.md").read_text()


@pytest.mark.parametrize(("body", "args", "needle"), [
    ("2000-01-01,1\n2000-01-02,2\n2000-01-04,3\n", [], "missing timestamps between line 3"),
    ("2000-01-01,1\n2000-01-02,\n2000-01-03,3\n", [], "column 'v' line 3: missing value"),
    ("2000-01-01,1\n2000-01-02,x\n", [], "column 'v' line 3: 'x' is not a number"),
    ("2000-01-01,1\n2000-01-02,1\n", [], "target column 'v' is constant"),
    ("2000-01-01,1\n2000-01-02,2\n2000-01-03,3\n", ["--horizon", "9"], "--horizon 9 is longer than the series"),
    ("2000-01-01,1\n2000-01-02,2\n", ["--model", "prophet"], "--model 'prophet' is invalid"),
])
def test_forecast_errors_are_one_line(tmp_path, capsys, body, args, needle):
    csv = tmp_path / "e.csv"
    csv.write_text("date,v\n" + body)
    if "prophet" in args:  # a valid series long enough to reach the model check
        csv.write_text("date,v\n" + "\n".join(f"2000-01-{1 + i // 24:02d}T{i % 24:02d}:00,{np.sin(i)}"
                                               for i in range(24 * 20)) + "\n")
        args = args + ["--season", "2", "--horizon", "2"]
    assert main(["forecast", "--data", str(csv), "--target", "v", *args, "--out", str(tmp_path / "o")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and needle in err[0], err

"""ssmkit reproduce ts-forecast / ts-classify --quick: the pipeline end to end (the numbers mean nothing)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ssmkit.experiments.reproduce import get_reproduction, run_reproduction

pytestmark = pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None
                                or importlib.util.find_spec("sktime") is None,
                                reason="the baselines need statsmodels and sktime")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs limit torch and BLAS to one thread; give the other tests of this process theirs back."""
    threads = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(limits=None):
            yield
    torch.set_num_threads(threads)


def test_ts_forecast_quick(tmp_path):
    repro = get_reproduction("ts-forecast")
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False)
    (setting,) = repro.quick().settings
    rec = json.loads((tmp_path / "out" / setting.name / "seed0" / "record.json").read_text())
    rows = rec["extra"]["rows"]
    models = {r["model"] for r in rows}
    assert models == {"seasonal_naive", "ets", "arima", "spacetime", "smamba", "mamba", "s4d", "dlinear", "ssm"}
    ssm = [r for r in rows if r["model"] == "ssm"]
    assert len(ssm) == 10 and len({r["choice"] for r in ssm}) == 1  # 5 origins x 2 horizons, one choice
    assert all(0 <= r["cov80"] <= 1 for r in ssm)
    assert summary["settings"][0]["mean"] == float(sum(r["mase"] for r in ssm) / 10 < 1)
    md = (tmp_path / "docs" / "ts-forecast.md").read_text()
    assert "| data set | seasonal_naive | ets | arima | dlinear | ssm |" in md
    assert "Target 2, `ssm` mean rank <= ETS's" in md and "](ts-forecast.png)" in md
    assert (tmp_path / "docs" / "ts-forecast.png").stat().st_size > 0


def test_ts_classify_quick(tmp_path):
    repro = get_reproduction("ts-classify")
    summary = run_reproduction(repro, tmp_path / "out", quick=True, doc_dir=tmp_path / "docs", progress=False)
    (setting,) = repro.quick().settings
    rec = json.loads((tmp_path / "out" / setting.name / "seed0" / "record.json").read_text())
    rows = rec["extra"]["rows"]
    assert {r["model"] for r in rows} == {"ssm_bidir", "ssm_bidir_ensemble", "minirocket", "dtw_1nn"}
    ens = next(r for r in rows if r["model"] == "ssm_bidir_ensemble")
    assert summary["settings"][0]["mean"] == ens["accuracy"] and summary["settings"][0]["chance"] == 0.5
    assert ens["choice"] in ens["val"] and ens["val"][ens["choice"]] == max(ens["val"].values())
    md = (tmp_path / "docs" / "ts-classify.md").read_text()
    assert "| data set | ssm_bidir | ssm_bidir_ensemble | minirocket | dtw_1nn |" in md
    assert "within 3 points of MiniRocket" in md and "](ts-classify.png)" in md

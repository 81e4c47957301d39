"""MASE, sMAPE, MSE, MAE and ranks against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ssmkit.timeseries import metrics


def test_mase_by_hand():
    history = np.array([1.0, 3.0, 2.0, 4.0, 3.0])  # lag-2 differences: 1, 1, 1 -> scale 1
    assert metrics.mase_scale(history, 2) == 1.0
    assert metrics.mase_scale(history, 1) == pytest.approx((2 + 1 + 2 + 1) / 4)
    # |errors| 0.5 and 1.5 -> MAE 1.0, scaled by 1.5
    assert metrics.mase([4.5, 2.5], [4.0, 4.0], history, 1) == pytest.approx(1.0 / 1.5)


def test_smape_by_hand():
    # 200 |f-a| / (|f|+|a|): 200*1/3 = 66.67 and 200*0/2 = 0 -> mean 33.33; 0/0 counts as 0
    assert metrics.smape([1.0, 1.0], [2.0, 1.0]) == pytest.approx(100 / 3)
    assert metrics.smape([0.0, 2.0], [0.0, 2.0]) == 0.0


def test_mse_mae_by_hand():
    assert metrics.mse([1.0, 2.0, 3.0], [1.0, 0.0, 6.0]) == pytest.approx((0 + 4 + 9) / 3)
    assert metrics.mae([1.0, 2.0, 3.0], [1.0, 0.0, 6.0]) == pytest.approx((0 + 2 + 3) / 3)


def test_ranks_share_ties():
    r = metrics.ranks(np.array([[0.5, 0.2, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(r, [[2.5, 1.0, 2.5, 4.0], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(metrics.ranks(np.array([[0.9, 0.8]]), higher_is_better=True), [[1.0, 2.0]])


def test_metric_errors_are_one_line():
    with pytest.raises(ValueError, match="forecast has shape"):
        metrics.mse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="constant at lag season=2"):
        metrics.mase_scale(np.array([1.0, 2.0, 1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="longer than season=4"):
        metrics.mase_scale(np.arange(4.0), 4)


def test_forecast_table_ranks_and_targets():
    from ssmkit.timeseries.report import forecast_table

    rows = []
    for d, scores in {"a": {"seasonal_naive": 1.2, "ets": 0.8, "s4d": 0.9},
                      "b": {"seasonal_naive": 0.9, "ets": 1.1, "s4d": 1.0}}.items():
        for m, v in scores.items():  # two rows per cell average to v
            rows += [{"dataset": d, "model": m, "mase": v - 0.1, "smape": 1.0, "mse": 1.0, "mae": 1.0},
                     {"dataset": d, "model": m, "mase": v + 0.1, "smape": 1.0, "mse": 1.0, "mae": 1.0}]
    table, summary = forecast_table(rows, ("s4d",))
    assert summary["mean_rank"] == {"seasonal_naive": 2.0, "ets": 2.0, "s4d": 2.0}
    assert summary["best_ssm"] == "s4d" and summary["best_ssm_share_below_1"] == 0.5
    assert summary["best_ssm_share_beating_naive"] == 0.5
    assert "| a | 1.200 | **0.800** | 0.900 |" in table and "| sets with MASE < 1 | 1/2 | 1/2 | 1/2 |" in table


def test_write_section_replaces_only_its_section(tmp_path):
    from ssmkit.timeseries.report import write_section

    doc = tmp_path / "d.md"
    doc.write_text("intro\n<!-- x:begin -->\nold\n<!-- x:end -->\noutro\n")
    write_section(doc, "x", "new table", "unused")
    assert doc.read_text() == "intro\n<!-- x:begin -->\nnew table\n<!-- x:end -->\noutro\n"
    with pytest.raises(ValueError, match="markers <!-- y:begin -->"):
        write_section(doc, "y", "t", "unused")

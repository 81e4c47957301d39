"""User CSVs (ETT layout) on small synthetic files: a good file, and a one-line error for each problem."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from ssmkit.timeseries.csv_run import plan
from ssmkit.timeseries.csv_series import load_csv_series


def write(tmp_path, rows, header="date,HUFL,OT", name="x.csv"):
    p = tmp_path / name
    p.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return p


def hourly(n, start=datetime(2016, 7, 1)):
    return [(start + timedelta(hours=i)).isoformat(sep=" ") for i in range(n)]


def test_ett_layout_loads_with_season_and_covariates(tmp_path):
    stamps = hourly(50)
    p = write(tmp_path, [(s, i % 7, np.sin(i / 3)) for i, s in enumerate(stamps)])
    s = load_csv_series(p, "OT")
    assert s.values.shape == (50, 1) and s.columns == ["OT"] and s.season == 24 and s.step == "1:00:00"
    np.testing.assert_allclose(s.values[:, 0], np.sin(np.arange(50) / 3), rtol=1e-12)
    s = load_csv_series(p, "OT", covariates="all")
    assert s.columns == ["OT", "HUFL"] and s.values.shape == (50, 2)


def test_monthly_steps_are_calendar_months(tmp_path):
    rows = [(f"{2000 + i // 12}-{i % 12 + 1:02d}-01", 1, float(i % 5)) for i in range(30)]
    s = load_csv_series(write(tmp_path, rows), "OT")
    assert s.season == 12 and s.step == "1 month(s)"


def test_missing_timestamp_names_the_lines(tmp_path):
    stamps = hourly(10)
    del stamps[6]
    p = write(tmp_path, [(s, 1, float(i)) for i, s in enumerate(stamps)])
    with pytest.raises(ValueError, match=r"missing timestamps between line 7 \(2016-07-01 05:00:00\) and line 8"):
        load_csv_series(p, "OT")


def test_unordered_and_bad_timestamps(tmp_path):
    stamps = hourly(6)
    stamps[3], stamps[4] = stamps[4], stamps[3]
    with pytest.raises(ValueError, match="line 6: timestamp .* does not come after"):
        load_csv_series(write(tmp_path, [(s, 1, float(i)) for i, s in enumerate(stamps)]), "OT")
    with pytest.raises(ValueError, match=r"column 'date' line 3: 'yesterday' is not an ISO 8601 timestamp"):
        load_csv_series(write(tmp_path, [("2016-07-01", 1, 1.0), ("yesterday", 1, 2.0)]), "OT")


def test_nan_is_an_error_unless_filled(tmp_path):
    rows = [(s, 1, "" if i == 4 else float(i)) for i, s in enumerate(hourly(10))]
    rows[7] = (rows[7][0], 1, "NaN")
    p = write(tmp_path, rows)
    with pytest.raises(ValueError, match=r"column 'OT' line 6: missing value \(2 in the column\); pass fill="):
        load_csv_series(p, "OT")
    f = load_csv_series(p, "OT", fill="ffill")
    assert f.filled == 2 and f.values[4, 0] == 3.0 and f.values[7, 0] == 6.0
    lin = load_csv_series(p, "OT", fill="linear")
    np.testing.assert_allclose(lin.values[:, 0], np.arange(10.0))
    rows[0] = (rows[0][0], 1, "")
    with pytest.raises(ValueError, match="line 2: missing value at the start"):
        load_csv_series(write(tmp_path, rows), "OT", fill="ffill")
    with pytest.raises(ValueError, match="fill='drop' is invalid"):
        load_csv_series(p, "OT", fill="drop")


def test_non_numeric_target_and_unknown_columns(tmp_path):
    p = write(tmp_path, [(s, 1, "high" if i == 2 else 1.0 + i) for i, s in enumerate(hourly(5))])
    with pytest.raises(ValueError, match=r"column 'OT' line 4: 'high' is not a number"):
        load_csv_series(p, "OT")
    with pytest.raises(ValueError, match=r"target column 'LUFL' is not in the header \(date, HUFL, OT\)"):
        load_csv_series(p, "LUFL")
    with pytest.raises(ValueError, match="covariate 'X' is not a numeric column"):
        load_csv_series(p, "HUFL", covariates="X")


def test_constant_series(tmp_path):
    p = write(tmp_path, [(s, 1, 3.0) for s in hourly(20)])
    with pytest.raises(ValueError, match=r"target column 'OT' is constant \(3 on all 20 rows\)"):
        load_csv_series(p, "OT")


def test_horizon_longer_than_the_series_and_other_plan_errors(tmp_path):
    s = load_csv_series(write(tmp_path, [(t, 1, float(i % 5)) for i, t in enumerate(hourly(60))]), "OT")
    with pytest.raises(ValueError, match=r"--horizon 60 is longer than the series \(60 rows"):
        plan(s, 60, None, 4)
    with pytest.raises(ValueError, match="--horizon 20: 5 forecast origins need more than the 60 rows"):
        plan(s, 20, None, 4)
    with pytest.raises(ValueError, match="--context 40 leaves fewer than 16 training windows"):
        plan(s, 4, 40, 4)
    p = plan(s, 4, None, 4)
    assert p.horizons == (2, 4) and p.season == 4 and p.context == 12

"""User CSV series in the ETT layout: a timestamp column, then numeric columns (e.g. ``date,HUFL,...,OT``).

Every problem is a one-line ``ValueError`` naming the file, the column and the line (the header is line 1):
unparsable or missing timestamps, non-numeric cells, missing values without an explicit ``fill``, and a
constant target. Missing values are never dropped silently.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

FILLS = ("ffill", "linear")
_MISSING = {"", "nan", "na", "n/a", "null", "none", "?"}
_SEASONS = {timedelta(minutes=10): 144, timedelta(minutes=15): 96, timedelta(minutes=30): 48,
            timedelta(hours=1): 24, timedelta(days=1): 7, timedelta(weeks=1): 52}
_MONTH_SEASONS = {1: 12, 3: 4, 12: 1}


@dataclass
class CsvSeries:
    """``values`` (time, variates) float64 with the target in column 0, ``columns`` their names."""

    path: str
    values: np.ndarray
    columns: list[str]
    timestamps: list[datetime]
    step: str
    season: int
    filled: int  # number of cells filled by ``fill``


def _step(path: str, date: str, stamps: list[datetime]) -> tuple[str, int]:
    """Check the timestamps are regular and complete -> (step description, inferred season)."""
    for i in range(1, len(stamps)):
        if stamps[i] <= stamps[i - 1]:
            raise ValueError(f"{path}: column {date!r} line {i + 2}: timestamp {stamps[i]} does not come after "
                             f"{stamps[i - 1]} (line {i + 1}); sort the file and remove duplicates")
    same_slot = len({(s.day, s.time()) for s in stamps}) == 1
    months = [s.year * 12 + s.month for s in stamps]
    gaps = [b - a for a, b in zip(months, months[1:], strict=False)]
    if same_slot and gaps and Counter(gaps).most_common(1)[0][0] in (1, 3, 12):
        step = Counter(gaps).most_common(1)[0][0]
        diffs, what = gaps, f"{step} month(s)"
    else:
        diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        step = Counter(diffs).most_common(1)[0][0] if diffs else timedelta(0)
        what = str(step)
    for i, d in enumerate(diffs):
        if d != step:
            raise ValueError(f"{path}: column {date!r}: missing timestamps between line {i + 2} ({stamps[i]}) and "
                             f"line {i + 3} ({stamps[i + 1]}); the series steps by {what}")
    season = _MONTH_SEASONS.get(step, 1) if isinstance(step, int) else _SEASONS.get(step, 1)
    return what, season


def _fill(path: str, name: str, col: np.ndarray, fill: str | None, lines: np.ndarray) -> int:
    """Fill NaNs of one column in place by ``fill``; raise naming the first missing line when fill is None."""
    nan = np.isnan(col)
    if not nan.any():
        return 0
    first = int(np.argmax(nan))
    if fill is None:
        raise ValueError(f"{path}: column {name!r} line {lines[first]}: missing value ({int(nan.sum())} in the "
                         f"column); pass fill= one of {', '.join(FILLS)} (--fill) to fill them")
    if nan[0]:
        raise ValueError(f"{path}: column {name!r} line {lines[0]}: missing value at the start cannot be "
                         f"filled by {fill!r}; trim the leading rows")
    idx = np.arange(len(col))
    if fill == "ffill":
        last = np.maximum.accumulate(np.where(nan, 0, idx))
        col[:] = col[last]
    else:
        if nan[-1]:
            raise ValueError(f"{path}: column {name!r} line {lines[-1]}: missing value at the end cannot be "
                             "interpolated; trim the trailing rows or use fill='ffill'")
        col[nan] = np.interp(idx[nan], idx[~nan], col[~nan])
    return int(nan.sum())


def load_csv_series(path: str | Path, target: str, *, date: str = "", covariates: str = "none",
                    fill: str | None = None) -> CsvSeries:
    """Read ``target`` (and ``covariates``: 'none', 'all' other numeric columns, or comma-separated names).

    ``date`` names the timestamp column ('' = the first column); timestamps are ISO 8601.
    """
    path = str(path)
    if fill is not None and fill not in FILLS:
        raise ValueError(f"fill={fill!r} is invalid: expected one of {', '.join(FILLS)} (or none)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f)]
    header = [c.strip() for c in rows[0]] if rows else []
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    if len(header) < 2 or not body:
        raise ValueError(f"{path}: expected a header 'date,COL,...' and data rows, got {len(header)} column(s) "
                         f"and {len(body)} row(s)")
    date = date or header[0]
    for what, name in (("date", date), ("target", target)):
        if name not in header:
            raise ValueError(f"{path}: {what} column {name!r} is not in the header ({', '.join(header)})")
    if target == date:
        raise ValueError(f"{path}: target={target!r} is the timestamp column")
    if covariates == "none":
        names = [target]
    elif covariates == "all":
        names = [target] + [c for c in header if c not in (date, target)]
    else:
        names = [target] + [c.strip() for c in covariates.split(",") if c.strip() != target]
        for c in names[1:]:
            if c not in header or c == date:
                raise ValueError(f"{path}: covariate {c!r} is not a numeric column of the header ({', '.join(header)})")
    di = header.index(date)
    stamps = []
    for line, r in body:
        cell = r[di].strip() if di < len(r) else ""
        try:
            stamps.append(datetime.fromisoformat(cell))
        except ValueError:
            raise ValueError(f"{path}: column {date!r} line {line}: {cell!r} is not an ISO 8601 timestamp") from None
    step, season = _step(path, date, stamps)
    lines = np.array([line for line, _ in body])
    values = np.empty((len(body), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        ci = header.index(name)
        for i, (line, r) in enumerate(body):
            cell = r[ci].strip() if ci < len(r) else ""
            if cell.lower() in _MISSING:
                values[i, j] = np.nan
                continue
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"{path}: column {name!r} line {line}: {cell!r} is not a number") from None
            if not np.isfinite(values[i, j]):
                raise ValueError(f"{path}: column {name!r} line {line}: {cell!r} is not a finite number")
    filled = sum(_fill(path, name, values[:, j], fill, lines) for j, name in enumerate(names))
    t = values[:, 0]
    if np.all(t == t[0]):
        raise ValueError(f"{path}: target column {target!r} is constant ({t[0]:g} on all {len(t)} rows); "
                         "there is nothing to forecast")
    return CsvSeries(path, values, names, stamps, step, season, filled)

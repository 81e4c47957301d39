"""``ssmkit forecast``: train a forecaster on a CSV column, score it against the baselines, plot and report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import int_at_least

#: the names of ``timeseries.models.FORECASTERS`` (a test keeps them equal; listed here to keep torch unloaded)
MODELS = ("spacetime", "smamba", "mamba", "s4d", "dlinear")


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    from ..timeseries.csv_series import FILLS  # numpy only: building the parser does not import torch

    p = sub.add_parser("forecast", help="forecast a CSV column with an SSM vs seasonal naive, ETS, ARIMA, DLinear",
                       formatter_class=fmt, description=(
                           "Read FILE.csv (a timestamp column, then numeric columns, as in ETT), evaluate MODEL\n"
                           "and the baselines over 5 rolling origins at horizons H/2 and H (MASE, sMAPE, and\n"
                           "MSE/MAE on the z-normalised target), and write OUT/report.md, metrics.json,\n"
                           "forecast.png and intervals.png (80% intervals: MODEL's calibrated Gaussian head,\n"
                           "mixed over seeds, and ARIMA's). See docs/time_series.md."))
    p.add_argument("--data", required=True, metavar="FILE.csv", help="the CSV file")
    p.add_argument("--target", required=True, metavar="COL", help="the column to forecast")
    p.add_argument("--horizon", type=int_at_least(1), help="steps ahead (default: the season, or 10)")
    p.add_argument("--model", default="spacetime", help=f"one of {', '.join(MODELS)} (default: spacetime)")
    p.add_argument("--out", default="runs/forecast", metavar="DIR", help="output directory (default: runs/forecast)")
    p.add_argument("--date-col", default="", help="timestamp column (default: the first column)")
    p.add_argument("--covariates", default="none", help="'none', 'all' or comma-separated extra input columns")
    p.add_argument("--fill", choices=FILLS, help="fill missing values (default: missing values are an error)")
    p.add_argument("--season", type=int_at_least(1), help="season length (default: from the timestamp step)")
    p.add_argument("--context", type=int_at_least(2), help="input window (default: max(2 season, 3 horizon))")
    p.add_argument("--steps", type=int_at_least(1), default=150, help="training steps (default: 150)")
    p.add_argument("--seeds", type=int_at_least(1), default=1, help="seeds of the neural models (default: 1)")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch and BLAS threads (default: 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..timeseries.csv_run import plan, run_csv
    from ..timeseries.csv_series import load_csv_series
    from ..timeseries.protocol import TrainConfig
    from ..timeseries.suite import FORECAST_RECIPE, limit_threads

    limit_threads(args.threads)
    series = load_csv_series(args.data, args.target, date=args.date_col, covariates=args.covariates,
                             fill=args.fill)
    p = plan(series, args.horizon, args.context, args.season)
    out = Path(args.out)
    cfg = TrainConfig(steps=args.steps, **FORECAST_RECIPE)  # the forecasting suite's recipe
    result = run_csv(series, args.model, p, out, list(range(args.seeds)), cfg)
    print(f"{args.target}: season {p.season}, context {p.context}, horizons {', '.join(map(str, p.horizons))}")
    print(f"{'model@horizon':>22s}  {'MASE':>7s}  {'sMAPE':>7s}")
    for key, v in result["table"].items():
        print(f"{key:>22s}  {v['mase']:7.3f}  {v['smape']:7.2f}")
    print(f"lowest mean MASE: {result['best']}; wrote {out / 'report.md'}, metrics.json, "
          f"{', '.join(result['files'])}")
    return 0

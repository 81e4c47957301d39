"""One user series end to end: the rolling-origin protocol, a report and plots (behind ``ssmkit forecast``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .baselines import STAT_FORECASTERS
from .csv_series import CsvSeries
from .models import FORECASTERS
from .protocol import TrainConfig, evaluate_forecasting, origins

N_ORIGINS = 5
MIN_WINDOWS = 16


@dataclass
class Plan:
    horizons: tuple[int, ...]
    context: int
    season: int


def plan(series: CsvSeries, horizon: int | None, context: int | None, season: int | None) -> Plan:
    """Choose and check horizon, context and season; one-line ValueErrors name the flag.

    Defaults: season from the timestamp step; horizon = season (10 when the season is 1); context =
    max(2 season, 3 horizon), capped so that at least 16 windows (besides the horizon - 1 that the purged
    validation split drops) end before the first origin.
    """
    n = len(series.values)
    m = season if season is not None else series.season
    h = horizon if horizon is not None else (m if m > 1 else 10)
    if h >= n:
        raise ValueError(f"--horizon {h} is longer than the series ({n} rows of {series.path})")
    horizons = tuple(sorted({max(1, h // 2), h}))
    try:
        first = origins(n, horizons, N_ORIGINS)[0]
    except ValueError:
        raise ValueError(f"--horizon {h}: {N_ORIGINS} forecast origins need more than the {n} rows of "
                         f"{series.path}; lower --horizon") from None
    # the longest context that leaves MIN_WINDOWS windows before the first origin besides the horizon - 1
    # windows the purged validation split drops (TrainConfig.purge)
    room = first - h - MIN_WINDOWS + 1 - (h - 1)
    if context is None:
        context = min(max(2 * m, 3 * h), room)
        if context < max(m, 2):
            raise ValueError(f"--season {m}: {n} rows leave room for a context of only {max(room, 0)} steps "
                             f"before the first origin; lower --horizon or --season")
    elif context > room:
        raise ValueError(f"--context {context} leaves fewer than {MIN_WINDOWS} training windows in the {first} rows "
                         f"before the first origin; use --context <= {max(room, 0)}")
    if m > context:
        raise ValueError(f"--season {m} is longer than the context ({context}); lower --season or raise --context")
    if m > first // 2:
        raise ValueError(f"--season {m}: the history before the first origin ({first} rows) must hold two seasons")
    return Plan(horizons, context, m)


def run_csv(series: CsvSeries, model: str, p: Plan, out: Path, seeds: list[int], cfg: TrainConfig) -> dict:
    """Evaluate ``model`` and the baselines on ``series``; write report.md, metrics.json and the plots."""
    if model not in FORECASTERS:
        raise ValueError(f"--model {model!r} is invalid: expected one of {', '.join(FORECASTERS)}")
    models = [model] + [b for b in (*STAT_FORECASTERS, "dlinear") if b != model]
    rows, kept = evaluate_forecasting(series.path, series.values, p.season, p.horizons, p.context, models, seeds,
                                      cfg, N_ORIGINS, keep_forecasts=True)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for m in models:
        for h in p.horizons:
            sel = [r for r in rows if r["model"] == m and r["horizon"] == h]
            table[(m, h)] = {k: float(np.mean([r[k] for r in sel])) for k in ("mase", "smape", "mse", "mae")}
    filled = f", {series.filled} missing cell(s) filled" if series.filled else ""
    covs = f"; covariates {', '.join(series.columns[1:])}" if len(series.columns) > 1 else ""
    lines = [f"# Forecast report: {series.columns[0]} in {series.path}", "",
             f"{len(series.values)} rows, step {series.step}, season {p.season}, context {p.context}, horizons "
             f"{', '.join(map(str, p.horizons))}, {N_ORIGINS} rolling origins, seeds {seeds}, {cfg.steps} steps"
             f"{filled}{covs}.", "",
             "| model | horizon | MASE | sMAPE (%) | MSE (z) | MAE (z) |", "|---|---|---|---|---|---|"]
    for (m, h), v in table.items():
        lines.append(f"| {m} | {h} | {v['mase']:.3f} | {v['smape']:.2f} | {v['mse']:.3f} | {v['mae']:.3f} |")
    best = min(models, key=lambda m: np.mean([table[(m, h)]["mase"] for h in p.horizons]))
    lines += ["", f"Lowest mean MASE: **{best}**. MASE < 1 beats the in-sample seasonal-naive error.", ""]
    figs = _plots(series, kept, p, out)
    lines += [f"![{f}]({f})" for f in figs]
    lines += ["", f"intervals.png: 80% intervals; {model}'s is its calibrated Gaussian head (the mixture over "
              "seeds), ARIMA's is statsmodels' (none for seasons > 24)."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1) + "\n", encoding="utf-8")
    return {"best": best, "table": {f"{m}@{h}": v for (m, h), v in table.items()}, "files": figs}


def _plots(series: CsvSeries, kept: dict, p: Plan, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, h = series.values[:, 0], max(p.horizons)
    o = max(next(iter(kept.values())))  # the last origin
    t = np.arange(len(y))
    lo = max(0, o - 3 * max(h, p.season))
    files = []
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t[lo:], y[lo:], color="black", lw=1.2, label="actual")
    for m, per_origin in kept.items():
        ax.plot(t[o:o + h], per_origin[o]["mean"], lw=1.2, label=m)
    ax.axvline(o, color="grey", ls=":")
    ax.set(title=f"{series.columns[0]}: forecasts from the last origin", xlabel="row", ylabel=series.columns[0])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forecast.png", dpi=110)
    plt.close(fig)
    files.append("forecast.png")
    shown = (next(iter(kept)), "arima")  # the chosen model (listed first) and ARIMA
    with_intervals = {m: v[o] for m, v in kept.items() if m in shown and v[o].get("lower") is not None}
    if with_intervals:
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(t[lo:], y[lo:], color="black", lw=1.2, label="actual")
        for m, f in with_intervals.items():
            line = ax.plot(t[o:o + h], f["mean"], lw=1.2, label=f"{m} mean")[0]
            ax.fill_between(t[o:o + h], f["lower"], f["upper"], alpha=0.25, color=line.get_color(),
                            label=f"{m} 80% interval")
        ax.axvline(o, color="grey", ls=":")
        ax.set(title=f"{series.columns[0]}: prediction intervals", xlabel="row", ylabel=series.columns[0])
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "intervals.png", dpi=110)
        plt.close(fig)
        files.append("intervals.png")
    return files

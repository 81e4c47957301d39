"""Run the forecasting or classification suite and write its table into docs/time_series.md.

    python -m ssmkit.timeseries.suite forecast [--quick] [--out runs/timeseries] [--doc docs/time_series.md]
    python -m ssmkit.timeseries.suite classify [--quick]

The raw rows go to OUT/{forecast,classify}_rows.jsonl as they are produced; the section between the
suite's markers in the doc is replaced (the rest of the doc is left alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .baselines import CLASSIFIERS, STAT_FORECASTERS, classify_baseline
from .datasets import CLASSIFY_SUITE, FORECAST_SUITE, load_classification, load_series
from .models import FORECASTERS, SSM_FORECASTERS
from .protocol import TrainConfig, evaluate_forecasting, train_classifier
from .report import classify_table, forecast_table, write_section

TEMPLATE = ("# Time series\n\n## Forecasting\n\n<!-- ts-forecast:begin -->\n<!-- ts-forecast:end -->\n\n"
            "## Classification\n\n<!-- ts-classify:begin -->\n<!-- ts-classify:end -->\n")
FORECAST_MODELS = [*STAT_FORECASTERS, *FORECASTERS]
QUICK_FORECAST = ("wineind", "nile", "woolyrnq")
QUICK_CLASSIFY = ("ItalyPowerDemand", "GunPoint")


def limit_threads(n: int) -> None:
    """Use ``n`` threads in torch and in the BLAS under numpy/statsmodels (threadpoolctl, when installed):
    statsmodels' many small BLAS calls ran ~15x slower with two threads competing on a loaded machine."""
    torch.set_num_threads(n)
    try:
        import scipy.linalg  # noqa: F401  (load scipy's own BLAS first: only loaded libraries are limited)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _append(out: Path, suite: str, rows: list[dict]) -> None:
    """Append rows to OUT/SUITE_rows.jsonl as they are produced (an interrupted run keeps what it finished)."""
    with open(out / f"{suite}_rows.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def run_forecast(quick: bool, out: Path, rows: list[dict] | None = None) -> tuple[list[dict], str]:
    """Run the suite (or, given ``rows`` from an earlier run, only rebuild its text)."""
    seeds = [0] if quick else [0, 1, 2]
    cfg = TrainConfig(steps=40 if quick else 100)
    names = QUICK_FORECAST if quick else tuple(FORECAST_SUITE)
    rebuilt = rows is not None
    rows = list(rows or [])
    seconds: dict[str, float] = {}
    for name in () if rebuilt else names:
        s = load_series(name)
        for model in FORECAST_MODELS:
            t0 = time.perf_counter()
            got, _ = evaluate_forecasting(name, s.values, s.season, s.horizons, s.context, [model], seeds, cfg)
            seconds[model] = seconds.get(model, 0.0) + time.perf_counter() - t0
            rows += got
            _append(out, "forecast", got)
            _log(f"forecast {name} {model}: MASE {sum(r['mase'] for r in got) / len(got):.3f}")
    table, summary = forecast_table(rows, SSM_FORECASTERS)
    rank = summary["mean_rank"]
    best = summary.get("best_ssm")
    share = summary.get("best_ssm_share_below_1", 0.0)
    beat = summary.get("best_ssm_share_beating_naive", 0.0)
    text = "\n".join([
        f"Settings: {len(names)} series, seeds {seeds} (neural models; the statistical baselines are "
        f"deterministic), {cfg.steps} training steps, 5 rolling origins, horizons per series as in the list "
        "above. Cells: MASE, the mean over seeds, origins and horizons; bold is the best of the row.",
        "", table, "",
        f"- Best SSM by mean rank: **{best}** (mean rank {rank[best]:.2f}; ETS {rank['ets']:.2f}; "
        f"seasonal naive {rank['seasonal_naive']:.2f}; DLinear {rank['dlinear']:.2f}).",
        f"- Target 1, best SSM MASE < 1 on >= 80% of the sets: {100 * share:.0f}% -> "
        f"{'met' if share >= 0.8 else 'not met'}. (MASE < 1 means better than the seasonal-naive error "
        f"*in sample*; it beats the seasonal-naive forecast's own out-of-sample MASE on {100 * beat:.0f}% of "
        "the sets.)",
        f"- Target 2, its mean rank <= ETS's: {rank[best]:.2f} vs {rank['ets']:.2f} -> "
        f"{'met' if rank[best] <= rank['ets'] else 'not met'}.",
        "- Wall time per model over the suite (s, noisy shared machine): "
        + (", ".join(f"{m} {v:.0f}" for m, v in seconds.items()) if seconds else "see the run that made the rows")
        + ".",
    ])
    return rows, text


def run_classify(quick: bool, out: Path) -> tuple[list[dict], str]:
    seeds = [0] if quick else [0, 1, 2]
    cfg = TrainConfig(steps=50 if quick else 150, batch_size=16, lr=2e-3)
    names = QUICK_CLASSIFY if quick else CLASSIFY_SUITE
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    for name in names:
        train, test = load_classification(name)
        runs = [("ssm_bidir_s4d", seed) for seed in seeds] + [(b, 0) for b in CLASSIFIERS]
        for model, seed in runs:
            t0 = time.perf_counter()
            if model in CLASSIFIERS:
                acc = classify_baseline(model, train, test, seed)
            else:
                acc = train_classifier(train, test, seed, cfg)
            seconds[model] = seconds.get(model, 0.0) + time.perf_counter() - t0
            rows.append({"dataset": name, "model": model, "seed": seed, "accuracy": acc})
            _append(out, "classify", rows[-1:])
            _log(f"classify {name} {model} seed {seed}: {100 * acc:.1f}%")
    table, summary = classify_table(rows)
    acc = summary["mean_accuracy"]
    gap = 100 * (acc["minirocket"] - acc["ssm_bidir_s4d"])
    text = "\n".join([
        f"Settings: {len(names)} sets, the official train/test splits, SSM seeds {seeds} with {cfg.steps} steps "
        "(no validation split: the sets are small); MiniRocket (10,000 kernels, seed 0) and 1-NN DTW (Sakoe-Chiba "
        "window 10% of the length) from sktime. Cells: test accuracy (%), SSM as mean ± std over seeds.", "", table, "",
        f"- Target, SSM within 3 points of ROCKET on average: {gap:.1f} points behind -> "
        f"{'met' if gap <= 3 else 'not met'}.",
        "- Wall time per model over the suite (s, noisy shared machine): "
        + ", ".join(f"{m} {v:.0f}" for m, v in seconds.items()) + ".",
    ])
    return rows, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmkit.timeseries.suite", description=__doc__.split("\n")[0])
    ap.add_argument("suite", choices=("forecast", "classify"))
    ap.add_argument("--quick", action="store_true", help="a few sets, one seed, short training (a smoke run)")
    ap.add_argument("--out", default="runs/timeseries", help="directory for the raw rows (JSONL)")
    ap.add_argument("--doc", default="docs/time_series.md", help="markdown file whose section is replaced")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    ap.add_argument("--from-rows", metavar="JSONL", help="rebuild the forecast section from saved rows, no runs")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    limit_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_forecast if args.suite == "forecast" else run_classify
    if args.from_rows:
        if args.suite != "forecast":
            ap.error("--from-rows is implemented for the forecast suite only")
        with open(args.from_rows, encoding="utf-8") as f:
            rows, text = run_forecast(args.quick, out, [json.loads(line) for line in f if line.strip()])
    else:
        (out / f"{args.suite}_rows.jsonl").unlink(missing_ok=True)
        rows, text = run(args.quick, out)
    cmd = f"python -m ssmkit.timeseries.suite {args.suite}{' --quick' if args.quick else ''}"
    write_section(args.doc, f"ts-{args.suite}", f"Produced by `{cmd}`.\n\n{text}", TEMPLATE)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

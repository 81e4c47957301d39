"""Tables for the suites: per-data-set means over seeds, origins and horizons, ranks, and the issue's targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import ranks

BEGIN, END = "<!-- {key}:begin -->", "<!-- {key}:end -->"


def _mean_table(rows: list[dict], value: str) -> tuple[list[str], list[str], np.ndarray]:
    """(datasets, models, means (datasets, models)) of ``value`` over all other keys (NaN when absent)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = np.full((len(datasets), len(models)), np.nan)
    for i, d in enumerate(datasets):
        for j, m in enumerate(models):
            vals = [r[value] for r in rows if r["dataset"] == d and r["model"] == m]
            if vals:
                out[i, j] = float(np.mean(vals))
    return datasets, models, out


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def forecast_table(rows: list[dict], ssm_models: tuple[str, ...]) -> tuple[str, dict]:
    """Markdown table of MASE per data set and model, with mean ranks and the other metrics' means, and
    a summary dict (the best SSM by mean rank, its share of sets with MASE < 1, ETS's mean rank)."""
    datasets, models, mase = _mean_table(rows, "mase")
    r = ranks(mase)
    lines = [_fmt_row(["data set"] + models), _fmt_row(["---"] * (len(models) + 1))]
    for i, d in enumerate(datasets):
        best = np.nanmin(mase[i])
        lines.append(_fmt_row([d] + [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in mase[i]]))
    lines.append(_fmt_row(["mean rank (MASE)"] + [f"{v:.2f}" for v in r.mean(0)]))
    lines.append(_fmt_row(["sets with MASE < 1"] + [f"{int((mase[:, j] < 1).sum())}/{len(datasets)}"
                                                     for j in range(len(models))]))
    naive = mase[:, models.index("seasonal_naive")] if "seasonal_naive" in models else None
    if naive is not None:
        lines.append(_fmt_row(["sets beating seasonal naive"] + [f"{int((mase[:, j] < naive).sum())}/{len(datasets)}"
                                                              for j in range(len(models))]))
    for metric, label in (("smape", "mean sMAPE (%)"), ("mse", "mean MSE (z)"), ("mae", "mean MAE (z)")):
        _, _, t = _mean_table(rows, metric)
        lines.append(_fmt_row([label] + [f"{v:.3f}" for v in np.nanmean(t, 0)]))
    mean_rank = dict(zip(models, r.mean(0).tolist(), strict=True))
    ssm = [m for m in models if m in ssm_models]
    summary: dict = {"mean_rank": mean_rank}
    if ssm:
        best = min(ssm, key=mean_rank.__getitem__)
        j = models.index(best)
        summary.update(best_ssm=best, best_ssm_share_below_1=float((mase[:, j] < 1).mean()))
        if naive is not None:
            summary["best_ssm_share_beating_naive"] = float((mase[:, j] < naive).mean())
    return "\n".join(lines), summary


def classify_table(rows: list[dict]) -> tuple[str, dict]:
    """Markdown table of test accuracy (%) per data set and model (SSM: mean +- std over seeds), mean rank."""
    datasets, models, acc = _mean_table(rows, "accuracy")
    r = ranks(acc, higher_is_better=True)
    lines = [_fmt_row(["data set"] + models), _fmt_row(["---"] * (len(models) + 1))]
    for i, d in enumerate(datasets):
        cells = []
        for j, m in enumerate(models):
            vals = [x["accuracy"] for x in rows if x["dataset"] == d and x["model"] == m]
            cell = f"{100 * acc[i, j]:.1f}" + (f" ± {100 * np.std(vals):.1f}" if len(vals) > 1 else "")
            cells.append(f"**{cell}**" if acc[i, j] == np.nanmax(acc[i]) else cell)
        lines.append(_fmt_row([d] + cells))
    lines.append(_fmt_row(["mean accuracy"] + [f"{100 * v:.1f}" for v in np.nanmean(acc, 0)]))
    lines.append(_fmt_row(["mean rank"] + [f"{v:.2f}" for v in r.mean(0)]))
    return "\n".join(lines), {"mean_accuracy": dict(zip(models, np.nanmean(acc, 0).tolist(), strict=True))}


def write_section(path: str | Path, key: str, text: str, template: str) -> None:
    """Replace the text between the ``key`` markers of ``path`` (created from ``template`` if missing)."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8") if path.exists() else template
    begin, end = BEGIN.format(key=key), END.format(key=key)
    if begin not in doc or end not in doc:
        raise ValueError(f"{path}: markers {begin} ... {end} not found; restore them to update the section")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}", encoding="utf-8")

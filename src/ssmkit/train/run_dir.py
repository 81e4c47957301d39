"""A run directory's outputs: metrics (JSONL + CSV), curves (PNG), the resolved config and report.md.

    RUN_DIR/
        config.json, config.yaml     the resolved run config (task, model, train sections)
        metrics.jsonl                one record per line: {"step", "split": "train"|"val"|..., metrics...}
        metrics.csv                  the same records as a table (union of the columns)
        loss.png                     training (and validation) loss against the step
        metric.png                   the task's headline validation metric against the step, with chance level
        report.md                    task, model, parameter count, final metrics, throughput, memory, time
        checkpoints/                 see :mod:`ssmkit.train.checkpoints`
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

from .checkpoints import write_text_atomic
from .config import dump_yaml

log = logging.getLogger("ssmkit.train")

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
LOSS_PNG = "loss.png"
METRIC_PNG = "metric.png"
REPORT = "report.md"
CHECKPOINTS = "checkpoints"


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """config.json (and config.yaml when PyYAML is available)."""
    write_text_atomic(run_dir / CONFIG_JSON, json.dumps(resolved, indent=2) + "\n")
    text = dump_yaml(resolved)
    if text is not None:
        write_text_atomic(run_dir / CONFIG_YAML, text)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {str(run_dir)!r} an ssmkit run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(k in data for k in ("task", "model", "train")):
        raise ValueError(f"{path}: not a run config (needs sections task, model, train)")
    return data


class MetricsLog:
    """Append-only metrics.jsonl, kept in memory for the CSV and plots.

    ``truncate_after(step)`` drops records past a checkpoint's step when a run resumes from it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_JSONL
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line:
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipping a torn line", self.path)

    def truncate_after(self, step: int) -> None:
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def reset(self) -> None:
        self.records = []
        write_text_atomic(self.path, "")

    def append(self, record: dict[str, Any]) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def write_csv(self) -> Path:
        cols: list[str] = []
        for r in self.records:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        path = self.path.with_name(METRICS_CSV)
        write_text_atomic(path, buf.getvalue())
        return path

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.records:
            if r.get("split") == split and isinstance(r.get(key), (int, float)):
                xs.append(int(r["step"]))
                ys.append(float(r[key]))
        return xs, ys


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=90)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.91)
    return fig


def write_plots(
    run_dir: Path, metrics: MetricsLog, metric: str, chance: float | None, title: str
) -> list[Path]:
    """loss.png and metric.png (matplotlib's Agg canvas; the global backend is untouched). Skipped with a
    warning when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out = []
    fig = _figure()
    ax = fig.add_subplot()
    for split, key, style in (("train", "loss", "-"), ("val", "loss", "o-")):
        xs, ys = metrics.series(split, key)
        if xs:
            ax.plot(xs, ys, style, label=f"{split} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    path = run_dir / LOSS_PNG
    fig.savefig(path, format="png")
    out.append(path)

    fig = _figure()
    ax = fig.add_subplot()
    xs, ys = metrics.series("val", metric)
    if xs:
        ax.plot(xs, ys, "o-", label=f"val {metric}", markersize=3)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    path = run_dir / METRIC_PNG
    fig.savefig(path, format="png")
    out.append(path)
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(run_dir: Path, info: dict[str, Any]) -> Path:
    """report.md from ``info``: task, task_params, kind, metric, chance, model_summary, preset, head,
    parameters, steps, batch_size, lr, final (metrics dict), best, wall_time, tokens_per_s, peak_rss_bytes,
    checkpoint, interrupted, world_size (optional, data-parallel processes)."""
    final = info.get("final") or {}
    lines = [f"# ssmkit run: {info['task']} / {info['preset']}", ""]
    if info.get("interrupted"):
        lines += [f"**Interrupted at step {info['steps_done']} of {info['steps']}** (resume with "
                  f"`ssmkit train --resume --run-dir {run_dir}`).", ""]
    chance = info.get("chance")
    lines += [
        "## Task", "",
        f"- task: `{info['task']}` ({info['kind']}), parameters: `{json.dumps(info['task_params'])}`",
        f"- headline metric: `{info['metric']}` "
        f"({'higher' if info.get('higher_is_better', True) else 'lower'} is better); "
        f"chance level: {_fmt(chance) if chance is not None else 'n/a'}",
        "", "## Model", "",
        f"- preset: `{info['preset']}`, head: `{info['head']}`",
        f"- {info['model_summary']}",
        f"- parameters: {info['parameters']:,}",
        "", "## Training", "",
        f"- steps: {info['steps_done']} of {info['steps']}, batch size {info['batch_size']}, "
        f"peak lr {info['lr']:g}",
        *([f"- data parallel: {info['world_size']} processes, {info['batch_size'] // info['world_size']} "
           f"rows each per step; throughput and memory below are the whole job's and rank 0's"]
          if info.get("world_size", 1) > 1 else []),
        f"- wall time: {info['wall_time']:.1f} s, throughput: {info['tokens_per_s']:,.0f} tokens/s",
        f"- peak memory (RSS): {info['peak_rss_bytes'] / 2**20:,.0f} MiB",
        "", f"## Final metrics ({info.get('eval_split', 'val')} split)", "",
    ]
    if final:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final.items()]
        if chance is not None and info["metric"] in final:
            lines += ["", f"{info['metric']}: {_fmt(final[info['metric']])} vs chance {_fmt(chance)}"]
    else:
        lines += ["(no evaluation yet)"]
    lines += ["", "## Files", "",
              f"- checkpoint: `{info.get('checkpoint') or '(none)'}`",
              f"- metrics: `{METRICS_JSONL}`, `{METRICS_CSV}`; plots: `{LOSS_PNG}`, `{METRIC_PNG}`; "
              f"config: `{CONFIG_JSON}`", ""]
    path = Path(run_dir) / REPORT
    write_text_atomic(path, "\n".join(lines))
    return path

"""The report of a reproduction: ``NAME.md`` with the paper's claim and table beside ours, plots, the exact
command, wall time and machine; and the one-line summaries ``ssmkit reproduce --list`` prints."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .machine import machine_line
from .registry import Budget, Reproduction


@dataclass
class ReportContext:
    """What a report is written from. ``records``: one per (setting, seed) run (``setting``, ``seed``, ``meta``,
    ``metric``, ``value``, ``final``, ``extra``, ...); ``summary``: :func:`runner.summarise`'s dict."""

    repro: Reproduction
    budget: Budget
    quick: bool
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    def by_setting(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.records:
            out.setdefault(r["setting"], []).append(r)
        return out


def pct(mean: float, sd: float | None = None, n: int = 1) -> str:
    """'97.3' or '97.3 ± 1.2' (percent of fractions; '-' for NaN)."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if sd is None or n < 2:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def load_range(loads: list[float]) -> str:
    """'; load average 7.1-15.3 when the runs started' (or '' without loads)."""
    if not loads:
        return ""
    return f"; load average {min(loads):g}-{max(loads):g} when the runs started"


def headline_table(summary: dict[str, Any]) -> str:
    """Setting | coordinates | headline metric mean ± sd over seeds | min-max | seeds."""
    settings = summary["settings"]
    keys = list(dict.fromkeys(k for s in settings for k in s["meta"]))
    rows = []
    for s in settings:
        spread = "-" if s["n"] < 2 else f"{100 * s['min']:.1f}-{100 * s['max']:.1f}"
        rows.append([s["name"], *(str(s["meta"].get(k, "")) for k in keys),
                     pct(s["mean"], s["sd"], s["n"]), spread, str(s["n"])])
    metric = settings[0]["metric"] if settings else "metric"
    return table(["setting", *keys, f"{metric} % (mean ± sd)", "min-max", "seeds"], rows)


def write_report(ctx: ReportContext, directory: Path) -> Path:
    """Write ``directory/NAME.md`` (and the reproduction's plots beside it); returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    s, repro = ctx.summary, ctx.repro
    own = repro.report(ctx, directory) if repro.report is not None else ""
    budget = "QUICK (pipeline check only: the numbers mean nothing)" if ctx.quick else s.get("label", "full")
    chance = s["settings"][0]["chance"] if s["settings"] else None
    parts = [
        f"# Reproduction: {repro.title}",
        "",
        f"Written by `ssmkit reproduce {repro.name}`; regenerate it with the command below (finished runs are "
        f"kept in the output directory and skipped, so rerunning only rewrites this page).",
        "",
        "## The paper's claim",
        "",
        repro.claim.strip(),
        "",
        "## The paper's result",
        "",
        repro.paper.strip(),
        "",
        "## Ours",
        "",
        f"- Command: `{s['command'] or f'ssmkit reproduce {repro.name}'}`",
        f"- Budget: {budget}; {s['seeds']} seed(s) per setting, {s['runs']} runs. {ctx.budget.note}".rstrip(),
        f"- Wall time: {minutes(s['compute_s'])} of training and evaluation summed over the runs "
        f"(this invocation: {minutes(s['session_s'])}, {s['skipped']} finished runs reused).",
        f"- Machine: {machine_line(s['machine'])}{load_range(s.get('run_loads') or [])}. Report written "
        f"{s['finished']}.",
        "",
        headline_table(s),
        "",
        f"Chance level: {pct(chance)}%." if isinstance(chance, float) else "",
        "",
        own.strip(),
        "",
        *notes(directory, repro.name),
        "## Settings",
        "",
        "Each setting's sections as given to `ssmkit.train.resolve_run` (the runner adds `train.seed` and "
        "`threads=1, plots=false, eval_every=0, save_every=0` unless set):",
        "",
    ]
    for st in ctx.budget.settings:
        parts.append(f"- `{st.name}`: `{json.dumps(st.sections, sort_keys=True)}`")
    path = directory / repro.doc_name
    path.write_text("\n".join(parts).replace("\n\n\n", "\n\n") + "\n")
    return path


def notes(directory: Path, name: str) -> list[str]:
    """The hand-written observations ``directory/NAME.notes.md`` (what agrees with the paper, what does not
    and why), included in every regenerated report; none if the file does not exist."""
    path = Path(directory) / f"{name}.notes.md"
    if not path.is_file():
        return []
    return ["## Observations", "", f"(Hand-written in `{path.name}`; the numbers above are regenerated.)", "",
            path.read_text().strip(), ""]


def save_figure(fig: Any, directory: Path, name: str) -> str:
    """Save a matplotlib figure as ``directory/name`` (PNG) and close it; returns ``name`` for the markdown."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(Path(directory) / name, dpi=110)
    plt.close(fig)
    return name


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def last_result(name: str, places: list[Path]) -> tuple[str, str]:
    """(one-line last result, where it came from) of reproduction ``name`` from the first summary found in
    ``places`` (files ``NAME.json`` or ``result.json``); ('not run yet', '') if none."""
    for p in places:
        if p.is_file():
            try:
                s = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if s.get("name") == name:  # an OUT/result.json may belong to another reproduction
                return one_line(s), str(p)
    return "not run yet", ""


def one_line(summary: dict[str, Any]) -> str:
    """'quick|full, date: a 97.3, b 18.0, ... (N runs, wall)' from a summary."""
    items = [f"{x['name']} {pct(x['mean'])}" for x in summary.get("settings", [])]
    shown = ", ".join(items[:6]) + (f", ... ({len(items)} settings)" if len(items) > 6 else "")
    kind = summary.get("label") or ("quick" if summary.get("quick") else "full")
    return (f"{kind} run {summary.get('finished', '?')}: {shown} ({summary.get('runs', 0)} runs, "
            f"{minutes(float(summary.get('compute_s', 0.0)))})")

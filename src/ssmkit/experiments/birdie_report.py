"""Tables and plots of a Birdie comparison (``results.json`` of :func:`ssmkit.experiments.birdie.run_birdie`).

    write_report(results, out_dir)   # out_dir/birdie_report.md, phonebook.png, mixture_<run>.png, val_loss.png
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ssmkit.objectives.arms import OBJECTIVES


def _family(arm_name: str) -> str:
    return arm_name.split("(", 1)[0]


def class_shares(arm_names: list[str], action: list[float]) -> dict[str, float]:
    """Mixture mass per objective family."""
    out = {f: 0.0 for f in OBJECTIVES}
    for name, p in zip(arm_names, action, strict=True):
        out[_family(name)] += float(p)
    return {k: v for k, v in out.items() if any(_family(n) == k for n in arm_names)}


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: parameters, perplexity, infilling and phone-book digit accuracy per query count."""
    rows = []
    for name, r in results.items():
        row = {"run": name, "head": r["head"], "parameters": r["parameters"], "steps": r["steps"],
               "tokens": r["tokens"], "train_min": r["train_time"] / 60,
               "val_loss": r["val"].get("loss", math.nan), "val_ppl": r["val"].get("perplexity", math.nan),
               "infill_tok_acc": r["infilling"]["token_accuracy"], "infill_span_acc": r["infilling"]["span_accuracy"]}
        for q, m in r["phonebook"]["finetuned"].items():
            row[f"pb{q}"] = m["digit_accuracy"]
        for q, m in r["phonebook"]["zero_shot"].items():
            row[f"pb{q}_zero"] = m["digit_accuracy"]
        for n, acc in r.get("mqar", {}).get("accuracy", {}).items():
            row[f"mqar{n}"] = acc
        rows.append(row)
    return rows


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = summary_rows(results)
    if not rows:
        return "(no finished runs)\n"
    qs = [k for k in rows[0] if k.startswith("pb") and not k.endswith("_zero")]
    ms = sorted({k for r in rows for k in r if k.startswith("mqar")}, key=lambda k: int(k[4:]))
    head = ["run", "model", "params", "val loss (nats/byte)", "val ppl", "infill tok acc", "infill span acc",
            *[f"phone book {k[2:]}" for k in qs], *[f"MQAR {k[4:]}" for k in ms]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["head"], f"{r['parameters'] / 1e6:.2f}M", f"{r['val_loss']:.3f}", f"{r['val_ppl']:.2f}",
                 f"{r['infill_tok_acc']:.3f}", f"{r['infill_span_acc']:.3f}",
                 *[f"{r[k]:.3f} ({r[k + '_zero']:.2f})" for k in qs],
                 *[f"{r[k]:.3f}" if k in r else "-" for k in ms]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _val_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    path = run_dir / "metrics.jsonl"
    steps, losses = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("split") == "val" and "loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    return steps, losses


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the plots and ``birdie_report.md`` into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = summary_rows(results)
    if not rows:
        return written

    # phone-book digit accuracy per query count (after the fine-tune)
    qs = [k[2:] for k in rows[0] if k.startswith("pb") and not k.endswith("_zero")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(qs)) + i * width, [r[f"pb{q}"] for q in qs], width, label=r["run"])
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance (0.1)")
    ax.set_xticks(np.arange(len(qs)) + width * (len(rows) - 1) / 2, qs)
    ax.set_xlabel("queried numbers")
    ax.set_ylabel("digit accuracy (greedy)")
    ax.set_title("phone book after fine-tuning")
    written.append(_save(fig, ax, out / "phonebook.png"))

    # MQAR accuracy per number of pairs
    ms = sorted({k[4:] for r in rows for k in r if k.startswith("mqar")}, key=int)
    if ms:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            have = [n for n in ms if f"mqar{n}" in r]
            if have:
                ax.plot([int(n) for n in have], [r[f"mqar{n}"] for n in have], marker="o", label=r["run"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("value accuracy (teacher-forced)")
        ax.set_title("MQAR after fine-tuning")
        ax.set_ylim(0, 1.02)
        written.append(_save(fig, ax, out / "mqar.png"))

    # validation loss during pretraining
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in results:
        steps, losses = _val_curve(out / name)
        if steps:
            ax.plot(steps, losses, marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out next-token loss (nats/byte)")
    written.append(_save(fig, ax, out / "val_loss.png"))

    # mixture evolution of the controller runs: mass per objective family at each decision
    for name, r in results.items():
        logs = r.get("controller_log")
        if not logs:
            continue
        steps = [e["step"] for e in logs]
        shares = [class_shares(r["arm_names"], e["action"]) for e in logs]
        if r.get("steps", 0) > steps[-1]:  # the last decision holds to the end of the run
            steps, shares = [*steps, r["steps"]], [*shares, shares[-1]]
        fams = list(shares[0])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.stackplot(steps, np.array([[s[f] for s in shares] for f in fams]), labels=fams, step="post")
        for s, e in zip(steps, logs, strict=False):
            if e.get("explored"):
                ax.axvline(s, color="k", lw=0.5, ls=":")
        ax.set_xlabel("training step (decision points; dotted: exploration)")
        ax.set_ylabel("mixture mass per objective family")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: the controller's mixture")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(out / f"mixture_{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    md = out / "birdie_report.md"
    md.write_text("# Birdie comparison\n\n" + markdown_table(results) + "\nPhone book N: digit accuracy with N "
                  "queried numbers after the phone-book fine-tune (before it in parentheses); MQAR N: value "
                  "accuracy with N key-value pairs after the MQAR fine-tune.\n", encoding="utf-8")
    written.append(md)
    return written

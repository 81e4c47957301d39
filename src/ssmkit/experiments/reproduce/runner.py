"""Run a reproduction: every (setting, seed) in its own run directory, resumable, then aggregate and report.

    OUT/
        <setting>/seed<k>/          a Trainer run directory (config, metrics, checkpoints) plus
            sections.json           the exact sections it was started with (a mismatch is an error, not a resume)
            record.json             written when the run (training + extra evaluation) is finished
        result.json                 the summary: per-setting mean ± sd over seeds, command, wall time, machine
        NAME.md, NAME-*.png         the report (also written to the doc directory, see :func:`run_reproduction`)

A finished run (``record.json`` present) is skipped; an unfinished one continues from its newest checkpoint
with the Trainer's exact resume (Ctrl-C saves one), so an interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ssmkit.train import Trainer, latest_checkpoint, resolve_run
from ssmkit.train.run_dir import CHECKPOINTS

from .machine import machine_info
from .registry import Budget, Reproduction, Setting

RECORD = "record.json"
SECTIONS = "sections.json"
RESULT = "result.json"
#: train settings every run gets unless its setting says otherwise
TRAIN_DEFAULTS: dict[str, Any] = {"threads": 1, "plots": False, "eval_every": 0, "save_every": 0}


def run_sections(setting: Setting, seed: int) -> dict[str, dict[str, Any]]:
    """The setting's sections with the runner's train defaults and ``train.seed``."""
    sections = {k: copy.deepcopy(dict(v)) for k, v in setting.sections.items()}
    sections["train"] = {**TRAIN_DEFAULTS, **sections.get("train", {}), "seed": seed}
    return sections


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _claim_run_dir(run_dir: Path, sections: dict[str, Any]) -> None:
    """Create ``run_dir`` for ``sections``, or check that it already holds a run of the same sections."""
    path = run_dir / SECTIONS
    if path.exists():
        held = json.loads(path.read_text())
        if held != json.loads(json.dumps(sections)):
            raise ValueError(f"{run_dir} holds a run started with other settings ({path}); use another --out "
                             f"or delete that directory")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, sections)


def train_one(repro: Reproduction, setting: Setting, seed: int, run_dir: Path, quick: bool) -> dict[str, Any]:
    """The default ``run_one``: train ``setting`` with ``seed`` in ``run_dir`` (continuing from a checkpoint if
    there is one), then run the reproduction's extra evaluation; returns the run's record."""
    sections = run_sections(setting, seed)
    setup = resolve_run(sections)
    trainer = train_sections(setup, run_dir)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if repro.evaluate is not None:
        extra = with_threads(setup.train.threads, repro.evaluate, trainer.model, setup, setting, quick)
    metric = setup.task.metric
    return {"metric": metric, "value": float(trainer.last_eval.get(metric, math.nan)),
            "chance": setup.task.chance_level, "final": {k: float(v) for k, v in trainer.last_eval.items()},
            "extra": extra, "parameters": trainer.model.num_parameters(), "steps": setup.train.steps,
            "train_s": round(trainer.train_time, 2), "wall_s": round(trainer.elapsed() + time.perf_counter() - t0, 2)}


def train_sections(setup: Any, run_dir: Path) -> Trainer:
    """Train ``setup`` (a :class:`~ssmkit.train.RunSetup`) in ``run_dir`` to its last step, resuming from the
    newest checkpoint there if any; returns the Trainer (``.model``, ``.last_eval``)."""
    resume = latest_checkpoint(Path(run_dir) / CHECKPOINTS) is not None
    trainer = Trainer(setup, run_dir, resume=resume, quiet=True)
    trainer.train()
    return trainer


def with_threads(threads: int | None, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with torch's thread count set to ``threads`` (restored afterwards)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn(*args)
    finally:
        torch.set_num_threads(old)


def select(budget: Budget, *, seeds: int | None = None, only: str | None = None,
           steps: int | None = None) -> Budget:
    """``budget`` with ``seeds`` seeds, only the settings whose name matches one of the comma-separated globs
    ``only``, and every run trained for ``steps`` steps (warm-up capped at steps // 6)."""
    settings = budget.settings
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        settings = tuple(s for s in settings if any(fnmatch.fnmatchcase(s.name, p) for p in pats))
        if not settings:
            names = ", ".join(s.name for s in budget.settings)
            raise ValueError(f"--only {only!r} matches no setting; the settings are: {names}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        new = []
        for s in settings:
            train = dict(s.sections.get("train", {}))
            warm = train.get("warmup_steps")
            train.update(steps=steps, warmup_steps=min(steps // 6, 100 if warm is None else warm))
            new.append(replace(s, sections={**s.sections, "train": train}))
        settings = tuple(new)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"seeds: expected a positive int, got {seeds!r}")
    return replace(budget, settings=settings, seeds=budget.seeds if seeds is None else seeds)


def aggregate(values: list[float]) -> dict[str, float]:
    """mean, sample sd (0 for one value), min, max and n of ``values`` (NaNs dropped)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def run_reproduction(repro: Reproduction, out: str | Path, *, quick: bool = False, seeds: int | None = None,
                     only: str | None = None, steps: int | None = None, doc_dir: str | Path | None = None,
                     command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) ``repro`` into ``out`` and write its report; returns the summary (also OUT/result.json).

    The report ``NAME.md`` (and its PNGs) go to ``out`` and, when ``doc_dir`` is given, to ``doc_dir`` too,
    beside ``doc_dir/NAME.json`` (the summary ``ssmkit reproduce --list`` shows).
    """
    from tqdm.auto import tqdm

    from .report import ReportContext, write_report

    budget = select(repro.budget(quick), seeds=seeds, only=only, steps=steps)
    changes = [f"--{k} {v}" for k, v in (("steps", steps), ("only", only), ("seeds", seeds)) if v is not None]
    label = ("quick" if quick else "reduced" if changes else "full") + (f" ({', '.join(changes)})" if changes else "")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_one = repro.run_one or train_one
    start, machine = time.perf_counter(), machine_info()
    jobs = [(s, k) for s in budget.settings for k in range(budget.seeds)]
    records: list[dict[str, Any]] = []
    skipped = 0
    with tqdm(total=len(jobs), desc=f"reproduce {repro.name}", unit="run", disable=not progress) as bar:
        for setting, seed in jobs:
            run_dir = out / setting.name / f"seed{seed}"
            _claim_run_dir(run_dir, run_sections(setting, seed))
            done = run_dir / RECORD
            if done.exists():
                rec = json.loads(done.read_text())
                skipped += 1
            else:
                bar.set_postfix_str(f"{setting.name} seed {seed}")
                load = machine_info()["load_1min"]
                rec = {"setting": setting.name, "seed": seed, "meta": dict(setting.meta),
                       **run_one(repro, setting, seed, run_dir, quick), "load_1min": load}
                _write_json(done, rec)
            records.append(rec)
            bar.update(1)
    summary = summarise(repro, budget, records, quick=quick, command=command, machine=machine,
                        session_s=time.perf_counter() - start, skipped=skipped, label=label)
    ctx = ReportContext(repro=repro, budget=budget, quick=quick, records=records, summary=summary)
    targets = [out] + ([Path(doc_dir)] if doc_dir is not None else [])
    for target in targets:
        write_report(ctx, target)
    _write_json(out / RESULT, summary)
    if doc_dir is not None:
        _write_json(Path(doc_dir) / f"{repro.name}.json", summary)
    return summary


def summarise(repro: Reproduction, budget: Budget, records: list[dict[str, Any]], *, quick: bool, command: str,
              machine: dict[str, Any], session_s: float, skipped: int, label: str = "") -> dict[str, Any]:
    """Per-setting aggregates of the headline metric over seeds, plus what ran, where and how long."""
    settings = []
    for s in budget.settings:
        recs = [r for r in records if r["setting"] == s.name]
        settings.append({"name": s.name, "meta": dict(s.meta), "metric": recs[0]["metric"],
                         "chance": recs[0]["chance"], "values": [r["value"] for r in recs],
                         **aggregate([r["value"] for r in recs])})
    return {"name": repro.name, "title": repro.title, "quick": quick, "label": label or ("quick" if quick else "full"),
            "command": command,
            "seeds": budget.seeds, "budget_note": budget.note, "expected_minutes": budget.minutes,
            "settings": settings, "runs": len(records), "skipped": skipped,
            "compute_s": round(sum(r.get("wall_s", 0.0) for r in records), 1), "session_s": round(session_s, 1),
            "run_loads": [r["load_1min"] for r in records if r.get("load_1min") is not None],
            "machine": machine, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

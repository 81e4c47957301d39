"""The initialisation study: do small presets escape the recall plateau under each init rule?

    python -m ssmkit.experiments.init_study [--quick] [--out DIR] [--seeds K] [--steps N]
        [--families attn,mamba,...] [--tasks mqar-32x4,...] [--inits scaled,legacy] [--lrs 1e-3,2e-3]

Trains every (task, family, init, lr, seed) of the grid with the library's own :class:`~ssmkit.train.Trainer`
and tasks (d_model 64, 2 layers: the presets), then writes ``OUT/init_study.json`` (one record per run) and
``OUT/init_study.md`` (one row per task and family, one column per init and lr: mean, min-max over seeds of the
final validation metric). Finished runs are kept in ``OUT/runs.jsonl`` and skipped when the study is run again,
and a run stopped part-way (Ctrl-C saves a checkpoint) continues from its checkpoint, so an interrupted study
resumes where it stopped.

Init rules (``model.init_std``, see docs/init.md): "scaled" is the default, embedding (and an untied LM head)
std ``d_model ** -0.5``; "legacy" is the old fixed std 0.02. ``--quick`` runs a tiny grid (d_model 16, a few
steps) that only checks the pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssmkit.train import Trainer, latest_checkpoint, resolve_run
from ssmkit.train.run_dir import CHECKPOINTS

#: name -> task section (small settings a 2-layer, d_model 64 model learns in ~600 steps when it learns at all)
TASKS: dict[str, dict[str, Any]] = {
    "mqar-32x4": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_pairs": 4},
    "mqar-64x8": {"name": "mqar", "vocab_size": 128, "seq_len": 64, "num_pairs": 8},
    "selective_copy": {"name": "selective_copy", "vocab_size": 16, "seq_len": 64, "num_tokens": 8},
    "induction": {"name": "induction_heads", "vocab_size": 16, "seq_len": 64},
}
#: the model presets compared
FAMILIES: tuple[str, ...] = ("attn", "mamba", "mamba2", "s4d", "h3", "gated", "hybrid")
#: init rule name -> model section fields
INITS: dict[str, dict[str, Any]] = {"scaled": {"init_std": None}, "legacy": {"init_std": 0.02}}


@dataclass
class StudyConfig:
    """The grid and the run settings shared by every cell."""

    tasks: Sequence[str] = ("mqar-32x4",)
    families: Sequence[str] = FAMILIES
    inits: Sequence[str] = ("legacy", "scaled")
    lrs: Sequence[float] = (1e-3,)
    seeds: int = 2
    steps: int = 600
    d_model: int = 64
    batch_size: int = 32
    eval_batches: int = 0
    threads: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, chosen, valid in (("tasks", self.tasks, TASKS), ("inits", self.inits, INITS)):
            bad = [c for c in chosen if c not in valid]
            if bad or not chosen:
                raise ValueError(f"StudyConfig.{name}: expected a non-empty subset of {', '.join(valid)}, "
                                 f"got {list(chosen)}")
        if not self.families:
            raise ValueError("StudyConfig.families: expected at least one model preset")
        if not self.lrs or any(not (isinstance(v, float) and math.isfinite(v) and v > 0) for v in self.lrs):
            raise ValueError(f"StudyConfig.lrs: expected positive floats, got {list(self.lrs)}")
        for name in ("seeds", "steps", "d_model", "batch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"StudyConfig.{name}: expected a positive int, got {v!r}")

    def cells(self) -> list[dict[str, Any]]:
        """Every run of the grid as a dict of its coordinates."""
        return [{"task": t, "family": f, "init": i, "lr": lr, "seed": s}
                for t in self.tasks for f in self.families for i in self.inits for lr in self.lrs
                for s in range(self.seeds)]


QUICK = StudyConfig(tasks=("mqar-32x4",), families=("attn", "mamba"), inits=("legacy", "scaled"), seeds=1,
                    steps=4, d_model=16, batch_size=8, eval_batches=1)


def run_key(cell: dict[str, Any]) -> str:
    return f"{cell['task']}|{cell['family']}|{cell['init']}|lr={cell['lr']:g}|seed={cell['seed']}"


def run_cell(cfg: StudyConfig, cell: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train one cell (continuing from a checkpoint in ``run_dir`` if there is one); returns its record
    (coordinates, final metrics, metric name, wall time)."""
    task = dict(TASKS[cell["task"]])
    if cfg.steps < 50:  # quick runs: small splits
        task.update(num_train=64, num_val=16, num_test=16)
    model = {"preset": cell["family"], "d_model": cfg.d_model, **INITS[cell["init"]], **cfg.model_overrides}
    train = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cell["lr"], "seed": cell["seed"],
             "threads": cfg.threads, "plots": False, "save_every": 0, "eval_every": 0,
             "eval_batches": cfg.eval_batches, "warmup_steps": min(100, cfg.steps // 6)}
    setup = resolve_run({"task": task, "model": model, "train": train})
    start = time.perf_counter()
    resume = latest_checkpoint(Path(run_dir) / CHECKPOINTS) is not None  # an interrupted run continues exactly
    final = Trainer(setup, run_dir, resume=resume, quiet=True).train()
    wall = time.perf_counter() - start
    metric = setup.task.metric
    return {**cell, "key": run_key(cell), "metric": metric, "value": float(final[metric]),
            "chance": setup.task.chance_level, "final": {k: float(v) for k, v in final.items()},
            "wall_s": round(wall, 2)}


def summarise(records: list[dict[str, Any]], cfg: StudyConfig) -> str:
    """The markdown table: rows task x family, columns init x lr, cells 'mean (min-max)' over seeds."""
    cols = [(i, lr) for i in cfg.inits for lr in cfg.lrs]
    head = ["task", "family", *(f"{i} lr={lr:g}" for i, lr in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in cfg.tasks:
        for f in cfg.families:
            row = [t, f]
            for i, lr in cols:
                vals = [r["value"] for r in records if (r["task"], r["family"], r["init"], r["lr"]) ==
                        (t, f, i, lr)]
                row.append(_cell(vals))
            lines.append("| " + " | ".join(row) + " |")
    walls = [r["wall_s"] for r in records]
    lines.append("")
    lines.append(f"{len(records)} runs, {cfg.steps} steps each, d_model {cfg.d_model}, batch {cfg.batch_size}, "
                 f"{cfg.seeds} seed(s); wall time per run {min(walls):.0f}-{max(walls):.0f} s, total "
                 f"{sum(walls) / 60:.1f} min; torch threads {cfg.threads}.")
    return "\n".join(lines) + "\n"


def _cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ({100 * min(vals):.1f}-{100 * max(vals):.1f})"


def run_study(cfg: StudyConfig, out: str | Path, *, log: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the grid into ``out``; writes init_study.json and init_study.md; returns the records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "runs.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    records = []
    old_threads = torch.get_num_threads()
    try:
        for cell in cfg.cells():
            key = run_key(cell)
            if key not in done:
                rec = run_cell(cfg, cell, out / "runs" / key.replace("|", "_"))
                with done_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                done[key] = rec
                if log:
                    print(f"{key}: {rec['metric']} {rec['value']:.4f} ({rec['wall_s']:.0f} s)", flush=True)
            records.append(done[key])
    finally:
        torch.set_num_threads(old_threads)
    (out / "init_study.json").write_text(json.dumps({"config": _config_dict(cfg), "runs": records}, indent=1))
    (out / "init_study.md").write_text(summarise(records, cfg))
    return records


def _config_dict(cfg: StudyConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def _csv(kind: type, text: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") \
            from e


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssmkit.experiments.init_study", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid that only checks the pipeline")
    p.add_argument("--out", default="runs/init_study", help="output directory (default: runs/init_study)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 600)")
    p.add_argument("--tasks", type=lambda s: _csv(str, s), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--families", type=lambda s: _csv(str, s), help="comma list of model presets")
    p.add_argument("--inits", type=lambda s: _csv(str, s), help="comma list of scaled, legacy")
    p.add_argument("--lrs", type=lambda s: _csv(float, s), help="comma list of peak learning rates")
    a = p.parse_args(argv)
    base = QUICK if a.quick else StudyConfig()
    changes = {k: v for k, v in (("seeds", a.seeds), ("steps", a.steps), ("tasks", a.tasks),
                                 ("families", a.families), ("inits", a.inits), ("lrs", a.lrs)) if v is not None}
    try:
        cfg = StudyConfig(**{**base.__dict__, **changes})
    except ValueError as e:
        p.error(str(e))
    run_study(cfg, a.out)
    print((Path(a.out) / "init_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ssmkit train``: train a model on a task into a run directory (or continue one with --resume)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, removed_on_failure, setup_logging, slug

_OUTPUTS = ("config.json", "config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "metric.png",
            "report.md")


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("train", help="train a model on a task", formatter_class=fmt, description=(
        "Train a model on a task; writes metrics.jsonl/.csv, loss.png, metric.png, report.md, config.json\n"
        "and checkpoints into the run directory. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint first;\n"
        "--resume continues exactly (model, optimizer, schedule, RNG, data position)."), epilog=(
        "examples:\n"
        "  ssmkit train --task mqar --model mamba --set task.seq_len=64 --set train.steps=500\n"
        "  ssmkit train --task selective_copy --model s4d --set model.d_model=128 --run-dir runs/sc\n"
        "  ssmkit train --task text --set task.path=book.txt --model mamba2 --set train.lr=1e-3\n"
        "  ssmkit train --config run.yaml --set train.batch_size=16\n"
        "  ssmkit train --resume --run-dir runs/sc --set train.steps=2000\n\n"
        "--set keys: task.<parameter> (see `ssmkit tasks`), model.<ModelConfig field> (d_model, pattern,\n"
        "n_layers, mlp, norm, dropout, ... and model.mixer_options.<mixer>.<option>, model.head),\n"
        "train.<field> (steps, batch_size, grad_accum, lr, min_lr_ratio, warmup_steps, schedule,\n"
        "weight_decay, grad_clip, seed, eval_every, eval_batches, log_every, save_every, dtype, autocast,\n"
        "activation_checkpointing, chunk_len, threads, ...). A bare key (lr=1e-3) works when unambiguous."))
    p.add_argument("--task", help="task name (see `ssmkit tasks`)")
    p.add_argument("--model", help="model preset (see `ssmkit models`) or a block pattern such as "
                                   "'mamba2*2,attn' (default: mamba)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with task/model/train sections")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default: runs/TASK-MODEL)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no info logging")
    p.set_defaults(func=run)


def _clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs (only ssmkit's own files) for --overwrite."""
    for name in _OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for p in run_dir.glob("eval_*.json"):
        p.unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _sections(args: argparse.Namespace, run_dir: Path | None) -> dict[str, dict[str, Any]]:
    from ..train import apply_overrides, load_config_file
    from ..train.run_dir import read_config

    if args.resume:
        if args.config:
            raise UsageError("--config cannot be combined with --resume (the run's own config.json is used; "
                             "change train settings with --set train.KEY=VALUE)")
        base = read_config(run_dir)
        for flag, section, key in (("task", "task", "name"), ("model", "model", "preset")):
            given = getattr(args, flag)
            if given is not None and given != base[section].get(key):
                raise UsageError(f"--{flag} {given} differs from the run's {section}.{key}="
                                 f"{base[section].get(key)!r}; a resumed run keeps its {section}")
        return apply_overrides(base, args.set or [])
    sections = load_config_file(args.config) if args.config else {"task": {}, "model": {}, "train": {}}
    if args.task is not None:
        if sections["task"].get("name") not in (None, args.task):
            sections["task"] = {}  # parameters of the file's task do not apply to another task
        sections["task"]["name"] = args.task
    if args.model is not None:
        sections["model"]["preset"] = args.model
    if not sections["task"].get("name"):
        from ..data import TASKS

        raise UsageError(f"no task given: use --task NAME (one of {', '.join(TASKS)}) or task.name in "
                         f"--config")
    return apply_overrides(sections, args.set or [])


def run(args: argparse.Namespace) -> int:
    from ..train import Trainer, TrainingInterrupted, resolve_run

    setup_logging(args.quiet)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        raise UsageError("--resume needs --run-dir DIR (the run to continue)")
    sections = _sections(args, run_dir)
    setup = resolve_run(sections)
    if run_dir is None:
        run_dir = Path("runs") / slug(f"{setup.task.name}-{setup.model.preset}")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise UsageError(f"run directory {run_dir} exists and is not empty; use --resume to continue it, "
                             f"--overwrite to start over, or another --run-dir")
        _clear_outputs(run_dir)
    log = logging.getLogger("ssmkit.train")
    trainer = None

    def wrote_something_real() -> bool:  # a checkpoint, or training records worth looking at
        return trainer is not None and (trainer.last_checkpoint is not None or trainer.step > 0)

    with removed_on_failure(run_dir, keep=wrote_something_real):
        trainer = Trainer(setup, run_dir, resume=args.resume, quiet=args.quiet)
        log.info("%s  (%s parameters)", trainer.model.summary(), f"{trainer.model.num_parameters():,}")
        log.info("task %s: %s; chance level %s; run directory %s", setup.task.name, setup.task.description,
                 setup.task.chance_level, run_dir)
        try:
            metrics = trainer.train()
        except TrainingInterrupted as e:
            print(f"interrupted at step {e.step}/{setup.train.steps}; checkpoint saved to {e.checkpoint}\n"
                  f"continue with: ssmkit train --resume --run-dir {run_dir}", file=sys.stderr)
            return 128 + e.signum
    m = setup.task.metric
    chance = setup.task.chance_level
    print(f"done: step {trainer.step}/{setup.train.steps}, val {m} {metrics.get(m, float('nan')):.4f}"
          + (f" (chance {chance:.4g})" if chance is not None else ""))
    print(f"report:     {run_dir / 'report.md'}")
    print(f"plots:      {run_dir / 'loss.png'}, {run_dir / 'metric.png'}")
    print(f"metrics:    {run_dir / 'metrics.jsonl'}, {run_dir / 'metrics.csv'}")
    print(f"checkpoint: {trainer.last_checkpoint}")
    return 0

"""``ssmkit eval``: a trained run's metrics on a split of its task."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .common import UsageError, int_at_least, load_run, setup_logging


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run's checkpoint", formatter_class=fmt, description=(
        "Evaluate the newest checkpoint of RUN_DIR (or the checkpoint directory given) on a split of its\n"
        "task with the task's metrics; prints them and writes RUN_DIR/eval_SPLIT.json."))
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoints/step-* dirs)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--batch-size", type=int_at_least(1), help="evaluation batch size (default: the run's)")
    p.add_argument("--max-batches", type=int_at_least(0, "0 = all"), default=0,
                   help="evaluate at most this many batches (0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate_model
    from ..train.checkpoints import write_text_atomic

    setup_logging(True)
    run_dir, ckpt, task, model, config = load_run(args.run_dir)
    if args.split not in task.splits:
        raise UsageError(f"--split {args.split!r}: task {task.name!r} has splits {', '.join(task.splits)}")
    bs = args.batch_size or config["train"].get("eval_batch_size") or config["train"].get("batch_size", 32)
    t = time.perf_counter()
    metrics = evaluate_model(model, task, args.split, bs, args.max_batches)
    secs = time.perf_counter() - t
    if not metrics:
        raise UsageError(f"--split {args.split!r}: no batch was evaluated, so nothing was written")
    out = {"checkpoint": str(ckpt), "split": args.split, "metric": task.metric,
           "chance_level": task.chance_level, "metrics": metrics, "seconds": secs}
    write_text_atomic(run_dir / f"eval_{args.split}.json", json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"checkpoint {ckpt} on task {task.name} ({args.split} split, {secs:.1f} s)")
    for k, v in metrics.items():
        mark = "  <- headline" if k == task.metric else ""
        print(f"  {k:>20s}: {v:.4f}{mark}")
    if task.chance_level is not None:
        print(f"  {'chance level':>20s}: {task.chance_level:.4f}")
    return 0

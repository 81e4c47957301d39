"""``ssmkit demo`` (= ``make demo``): train a small Mamba on selective copying, then evaluate and generate."""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import textwrap
import time
from typing import Any

from .common import quote

#: the main job: a small Mamba on selective copying (Mamba paper, sec. 3.1)
DEMO_TASK = "selective_copy"
DEMO_MODEL = "mamba"
DEMO_SETS = (
    "task.vocab_size=10", "task.seq_len=32", "task.num_tokens=4", "task.num_train=20000",
    "model.d_model=64", "train.steps=600", "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=50",
    "train.eval_every=100", "train.save_every=200", "train.threads=1",
)
DEMO_RUN_DIR = "runs/demo"


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("demo", help="the main job: train, evaluate and generate (a few minutes)",
                       formatter_class=fmt, description=(
        "Train a small Mamba on selective copying, then run `ssmkit eval` and `ssmkit generate` on its\n"
        "checkpoint in fresh processes. Training settings:\n"
        + textwrap.fill(" ".join(f"--set {x}" for x in DEMO_SETS), 100, initial_indent="  ",
                        subsequent_indent="  ")))
    p.add_argument("--run-dir", default=DEMO_RUN_DIR,
                   help=f"output directory (default: {DEMO_RUN_DIR}; replaced)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra overrides for the training run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    me = [sys.executable, "-m", "ssmkit.cli"]
    train = ["train", "--task", DEMO_TASK, "--model", DEMO_MODEL, *itertools.chain.from_iterable(
        ("--set", s) for s in (*DEMO_SETS, *(args.set or []))), "--run-dir", run_dir, "--overwrite"]
    if args.quiet:
        train.append("--quiet")
    steps = [
        ("train a small Mamba on selective copying: remember 4 tokens scattered among 28 blanks", train),
        ("evaluate the saved checkpoint in a fresh process", ["eval", run_dir]),
        ("generate from the checkpoint: prompted with the blanks, the scattered tokens and the first marker, "
         "the model must emit the first scattered token (validation examples 0-4)",
         ["generate", run_dir, "--example", "0", "1", "2", "3", "4"]),
    ]
    t0 = time.perf_counter()
    for i, (what, argv) in enumerate(steps, 1):
        print(f"\n=== [{i}/{len(steps)}] {what}\n$ ssmkit {' '.join(quote(a) for a in argv)}", flush=True)
        rc = subprocess.call([*me, *argv])
        if rc != 0:
            print(f"demo: step {i} failed with exit status {rc}", file=sys.stderr)
            return rc
    print(f"\n=== done in {time.perf_counter() - t0:.0f} s. The run directory {run_dir}/ holds report.md, "
          f"loss.png, metric.png, metrics.jsonl/.csv, config.json/.yaml and checkpoints/.")
    return 0

"""``ssmkit birdie``: the Birdie comparison of objective mixtures against next-token pretraining."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, removed_on_failure, setup_logging


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("birdie", help="the Birdie comparison: objective mixtures vs next-token pretraining",
                       formatter_class=fmt, description=(
        "Pretrain the same small model on one text with one token budget under each objective mixture (ntp,\n"
        "ul2, fixed, birdie, birdie-causal) and a Transformer with ntp; then evaluate held-out perplexity,\n"
        "infilling and phone-book retrieval (after a short phone-book fine-tune). Writes OUT/<run>/ (trainer\n"
        "run directories with result.json), OUT/results.json, OUT/birdie_report.md and plots. Running the\n"
        "same command again skips finished runs and resumes interrupted ones (Ctrl-C saves a checkpoint).\n"
        "Several processes may share OUT with different --runs."), epilog=(
        "examples:\n  ssmkit birdie --quick --out runs/birdie-smoke\n"
        "  ssmkit birdie --runs ntp,birdie --set tokens=3000000 --set d_model=256\n"
        "  ssmkit birdie --report-only --out runs/birdie\n\n"
        "--set keys are the fields of ssmkit.experiments.birdie_config.BirdieConfig (tokens, seq_len,\n"
        "batch_size, mixer, d_model, n_layers, lr, length_scale, controller_scale, phonebook_steps, ...)."))
    p.add_argument("--text", help="UTF-8 text to pretrain on (default: Tiny Shakespeare, shipped with ssmkit)")
    p.add_argument("--out", default="runs/birdie", help="output directory (default: runs/birdie)")
    p.add_argument("--runs", help="comma-separated runs (default: all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a BirdieConfig field")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke run: six 60-step runs that check the pipeline, not results "
                        "(about one CPU-minute)")
    p.add_argument("--report-only", action="store_true", help="only gather finished runs and write the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no info logging")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    import yaml

    from ..data.corpora import tiny_shakespeare_path
    from ..experiments.birdie_config import QUICK, RUNS, BirdieConfig

    fields = dict(QUICK) if args.quick else {}
    fields["text"] = args.text or str(tiny_shakespeare_path())
    if args.runs:
        runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
        unknown = [r for r in runs if r not in RUNS]
        if unknown:
            raise UsageError(f"--runs: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
        fields["runs"] = runs
    known = set(BirdieConfig.__dataclass_fields__)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        v = yaml.safe_load(value)
        fields[key] = tuple(v) if isinstance(v, list) else v
    return BirdieConfig.from_dict(fields)


def run(args: argparse.Namespace) -> int:
    from ..experiments.birdie import collect_results, run_birdie
    from ..experiments.birdie_report import markdown_table, write_report
    from ..train.trainer import TrainingInterrupted

    setup_logging(args.quiet)
    cfg = _config(args)
    out = Path(args.out)
    if args.report_only:
        results = collect_results(cfg, out)
        write_report(results, out)
    else:
        print(f"birdie: {len(cfg.runs)} run(s) of {cfg.steps} steps ({cfg.steps * cfg.batch_size * cfg.seq_len} "
              f"tokens each) on {cfg.text} -> {out}/", flush=True)
        try:
            with removed_on_failure(out, keep=lambda: out.is_dir() and any(out.iterdir())):
                results = run_birdie(cfg, out, quiet=args.quiet)
        except TrainingInterrupted as e:
            print(f"ssmkit birdie: {e}; run the same command again to continue", file=sys.stderr)
            return 130
    print(markdown_table(results), end="")
    print(f"results: {out / 'results.json'}, report and plots: {out}/")
    return 0

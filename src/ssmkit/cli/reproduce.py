"""``ssmkit reproduce``: the seed papers' claims at CPU scale, one command each."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, int_at_least, setup_logging

DOC_DIR = "docs/reproductions"


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's claim (induction heads, selective copying, MQAR, ...)",
                       formatter_class=fmt, description=(
        "Train and evaluate the settings of one paper claim with the library's trainer and tasks, several\n"
        "seeds each, and write NAME.md (the paper's table beside ours, plots, the exact command, wall time,\n"
        "machine) to OUT and, for full runs, to docs/reproductions/. Every (setting, seed) is a run directory\n"
        "under OUT: rerunning the same command skips finished runs and resumes an interrupted one exactly\n"
        "(Ctrl-C saves a checkpoint)."), epilog=(
        "examples:\n  ssmkit reproduce --list\n  ssmkit reproduce selective-copy --quick --out /tmp/sc\n"
        "  ssmkit reproduce selective-copy --seeds 3\n"
        "  ssmkit reproduce mqar --only 'w64-*' --steps 2000 --seeds 2 --out runs/mqar-w64"))
    p.add_argument("name", nargs="?", help="the reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions, their runtime and last result")
    p.add_argument("--quick", action="store_true", help="tiny settings that only check the pipeline (seconds)")
    p.add_argument("--out", help="output directory (default: runs/reproduce/NAME, or NAME-quick with --quick)")
    p.add_argument("--seeds", type=int_at_least(1), help="seeds per setting (default: the reproduction's)")
    p.add_argument("--steps", type=int_at_least(1), help="train every setting for this many steps (a reduced "
                   "budget; the report says so)")
    p.add_argument("--only", metavar="GLOBS", help="comma-separated globs of setting names to run")
    p.add_argument("--doc-dir", help=f"also write the report here (default: {DOC_DIR} for non-quick runs; "
                   "'none' to skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    parts = ["ssmkit", "reproduce", args.name]
    if args.quick:
        parts.append("--quick")
    for flag in ("out", "seeds", "steps", "only", "doc_dir"):
        v = getattr(args, flag)
        if v is not None:
            parts += [f"--{flag.replace('_', '-')}", str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _doc_places(name: str, out: str | None) -> list[Path]:
    from .. import __file__ as pkg

    places = [Path(DOC_DIR) / f"{name}.json", Path(pkg).resolve().parents[2] / DOC_DIR / f"{name}.json"]
    if out:
        places.insert(0, Path(out) / "result.json")
    return places + [Path("runs/reproduce") / name / "result.json"]


def list_reproductions(out: str | None = None) -> str:
    """One block per reproduction: name, title, full budget's expected runtime and seeds, last result."""
    from ..experiments.reproduce import reproductions
    from ..experiments.reproduce.report import last_result

    lines = []
    for name, repro in reproductions().items():
        full = repro.full()
        result, where = last_result(name, _doc_places(name, out))
        lines.append(f"{name}  [{len(full.settings)} settings x {full.seeds} seeds, full run ~{full.minutes:.0f} "
                     f"min on 2 cores]  {repro.title}")
        lines.append(f"    last result: {result}" + (f"  ({where})" if where else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import get_reproduction, run_reproduction
    from ..train import TrainingInterrupted

    if args.list:
        if args.name:
            raise UsageError("--list takes no NAME")
        print(list_reproductions(args.out))
        return 0
    if not args.name:
        raise UsageError("give a reproduction NAME or --list")
    repro = get_reproduction(args.name)
    setup_logging(quiet=True)
    out = args.out or f"runs/reproduce/{repro.name}{'-quick' if args.quick else ''}"
    doc_dir = args.doc_dir if args.doc_dir is not None else (None if args.quick else DOC_DIR)
    if doc_dir is not None and doc_dir.lower() == "none":
        doc_dir = None
    try:
        summary = run_reproduction(repro, out, quick=args.quick, seeds=args.seeds, only=args.only,
                                   steps=args.steps, doc_dir=doc_dir, command=_command(args),
                                   progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"ssmkit reproduce: {e}; run the same command again to resume", file=sys.stderr)
        return 130
    from ..experiments.reproduce.report import one_line

    print(one_line(summary))
    where = [Path(out) / repro.doc_name] + ([Path(doc_dir) / repro.doc_name] if doc_dir else [])
    print("report: " + ", ".join(map(str, where)))
    return 0

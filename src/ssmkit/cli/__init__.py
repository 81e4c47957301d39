"""The ``ssmkit`` command: train, eval, generate, tasks, models, bench, birdie, demo, export, import-gguf,
reproduce and forecast.

    ssmkit train --task mqar --model mamba --set task.seq_len=64 --set train.steps=500 --run-dir runs/mqar
    ssmkit eval runs/mqar
    ssmkit generate runs/mqar --example 0
    ssmkit tasks | ssmkit models | ssmkit bench | ssmkit demo
    ssmkit reproduce --list | ssmkit forecast --data series.csv --target y

One module per subcommand (``register(subparsers, formatter)`` adds its parser, ``run(args)`` runs it); shared
helpers are in :mod:`ssmkit.cli.common`. Errors in what the user typed (unknown names, bad values) print one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, birdie, demo, eval, export, forecast, generate, import_gguf, models, reproduce, tasks, train
from .common import EXIT_USAGE, Parser, UsageError

__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main"]

_COMMANDS = (train, eval, generate, tasks, models, bench, birdie, demo, export, import_gguf, reproduce, forecast)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="ssmkit", description="State space sequence models on CPU: train, evaluate and "
                    "generate.", formatter_class=fmt, epilog="Run `ssmkit COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub, fmt)
    return parser


def prefer_huge_pages() -> None:
    """Let torch's CPU allocator back large tensors with 2 MiB pages (``THP_MEM_ALLOC_ENABLE=1``) unless the user
    set the variable. torch reads it at its first large allocation, so this must run before any. On long-sequence
    training the kernel otherwise spends a large share of the step zeroing fresh 4 KiB pages: it cut CPU time by
    20-26% in ``benchmarks/bench_longseq.py --thp``."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    from ..data import MissingDataError

    prefer_huge_pages()

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"ssmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ssmkit tasks | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, MissingDataError) as e:
        # user errors (unknown names, bad values, missing files or data): one line, no traceback
        if os.environ.get("SSMKIT_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"ssmkit {args.command}: error: {msg}  (SSMKIT_DEBUG=1 shows a traceback)", file=sys.stderr)
        return EXIT_USAGE

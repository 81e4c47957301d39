"""Helpers shared by the subcommands: one-line errors, typed flag values, logging, finding a run's checkpoint."""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line (printed as one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (bad flag values, unknown options) are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}  (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------------------------------- flag values
def int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    """argparse ``type=`` for an int >= ``minimum`` (``note`` explains a special value, e.g. '0 = all')."""
    extra = f" ({note})" if note else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}{extra}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}{extra}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse ``type=`` for a finite float in the interval from ``low`` to ``high`` (open ends as given)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {text}")
        return value

    return parse


# ------------------------------------------------------------------------------------------- misc
def setup_logging(quiet: bool) -> None:
    """ssmkit's log records go to stderr as bare lines (INFO, or WARNING with ``quiet``)."""
    logger = logging.getLogger("ssmkit")
    if not any(getattr(h, "_ssmkit_cli", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._ssmkit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def quote(a: str) -> str:
    """Shell-quote ``a`` for display."""
    return a if re.fullmatch(r"[A-Za-z0-9_./=,:+-]+", a) else "'" + a.replace("'", "'\\''") + "'"


@contextmanager
def removed_on_failure(directory: Path, *, keep: Callable[[], bool]) -> Iterator[None]:
    """For a block that may create ``directory``: if the block raises, remove ``directory`` and the parents that
    did not exist on entry, unless ``keep()`` says something worth keeping was written. A directory that
    existed on entry is never removed."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    try:
        yield
    except BaseException:
        if missing and not keep():
            shutil.rmtree(missing[0], ignore_errors=True)
            for d in missing[1:]:
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    break
        raise


def find_run(path: str) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) from a run directory or one of its checkpoint directories."""
    from ..train.checkpoints import STATE_JSON, latest_checkpoint
    from ..train.run_dir import CHECKPOINTS

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such run directory")
    if (p / STATE_JSON).is_file():
        return p.parent.parent, p
    ckpt = latest_checkpoint(p / CHECKPOINTS)
    if ckpt is None:
        raise UsageError(f"{path}: no checkpoint found (expected {p / CHECKPOINTS}/step-*/); train first "
                         f"with `ssmkit train --run-dir {path}`")
    return p, ckpt


def load_run(path: str) -> tuple[Path, Path, Any, Any, dict]:
    """(run dir, checkpoint dir, task, model, run config) of a trained run."""
    from ..models import load_pretrained
    from ..train import resolve_task
    from ..train.run_dir import read_config

    run_dir, ckpt = find_run(path)
    config = read_config(run_dir)
    task = resolve_task(config["task"])
    model = load_pretrained(ckpt)
    return run_dir, ckpt, task, model, config

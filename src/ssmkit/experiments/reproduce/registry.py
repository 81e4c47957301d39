"""The reproduction registry: what a reproduction is, and where the runner finds them.

Every module of this package (other than ``registry``, ``runner``, ``report``, ``machine`` and names starting
with ``_``) that defines a module-level ``REPRODUCTION`` (a :class:`Reproduction`) is registered under
``REPRODUCTION.name``: adding a reproduction is adding one module, nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: modules of this package that are infrastructure, not reproductions
INFRASTRUCTURE = ("registry", "runner", "report", "machine", "longeval")


@dataclass(frozen=True)
class Setting:
    """One training configuration of a reproduction (the runner adds the seed).

    name: unique within the reproduction; becomes the run directory ``OUT/<name>/seed<k>`` (letters, digits,
        ``-_.=`` only).
    sections: ``{"task": ..., "model": ..., "train": ...}`` as :func:`ssmkit.train.resolve_run` takes them;
        ``train.seed`` is set by the runner.
    meta: the setting's coordinates for tables and plots (e.g. ``{"model": "mamba", "width": 128}``).
    """

    name: str
    sections: Mapping[str, Mapping[str, Any]]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ok = self.name and all(c.isalnum() or c in "-_.=" for c in self.name)
        if not ok:
            raise ValueError(f"Setting.name: expected letters, digits and -_.= only, got {self.name!r}")
        bad = set(self.sections) - {"task", "model", "train"}
        if bad:
            raise ValueError(f"Setting {self.name!r}: sections must be task, model, train; got {sorted(bad)}")


@dataclass(frozen=True)
class Budget:
    """A reproduction's settings at one budget: the settings, seeds, and how long it takes."""

    settings: tuple[Setting, ...]
    seeds: int
    minutes: float  # expected wall time on 2 idle cores (measured or estimated: say which in ``note``)
    note: str = ""  # where the paper's setting was shrunk, and how ``minutes`` was obtained

    def __post_init__(self) -> None:
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"Budget.settings: expected distinct, non-empty setting names, got {names}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"Budget.seeds: expected a positive int, got {self.seeds!r}")


#: run_one(repro, setting, seed, run_dir, quick) -> record dict (see runner.train_one, the default)
RunFn = Callable[..., dict[str, Any]]
#: evaluate(model, setup, setting, quick) -> extra results stored in the run's record under "extra"
EvalFn = Callable[..., dict[str, Any]]
#: report(ctx: report.ReportContext) -> markdown of the reproduction's own section (tables, plots it saves)
ReportFn = Callable[..., str]


@dataclass(frozen=True)
class Reproduction:
    """A paper claim, the settings that test it, and how to run and report them.

    name: the CLI name (``ssmkit reproduce NAME``); title: one line; claim: what the paper reports (markdown,
    with the paper's numbers); paper: the paper's table or figure in markdown, put beside ours in the doc.
    quick / full: the two budgets (``--quick`` only checks the pipeline). evaluate: extra evaluation of a
    trained model (e.g. accuracy at other lengths), run once per finished run and stored. run_one: how one
    (setting, seed) is trained (default: one Trainer run; override for multi-stage runs such as
    pretrain-then-finetune). report: the reproduction's own markdown section and plots.
    """

    name: str
    title: str
    claim: str
    paper: str
    quick: Callable[[], Budget]
    full: Callable[[], Budget]
    evaluate: EvalFn | None = None
    run_one: RunFn | None = None
    report: ReportFn | None = None

    def budget(self, quick: bool) -> Budget:
        return self.quick() if quick else self.full()

    @property
    def doc_name(self) -> str:
        return f"{self.name}.md"


def _discover() -> dict[str, Reproduction]:
    found: dict[str, Reproduction] = {}
    pkg = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules([str(Path(pkg.__file__).parent)]), key=lambda i: i.name):
        if info.name in INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        repro = getattr(module, "REPRODUCTION", None)
        if isinstance(repro, Reproduction):
            if repro.name in found:
                raise RuntimeError(f"two reproductions are named {repro.name!r} ({info.name})")
            found[repro.name] = repro
    return found


_CACHE: dict[str, Reproduction] = {}


def reproductions() -> dict[str, Reproduction]:
    """Every registered reproduction by name (modules are imported on the first call)."""
    if not _CACHE:
        _CACHE.update(_discover())
    return dict(_CACHE)


def get_reproduction(name: object) -> Reproduction:
    """The reproduction called ``name``; the error lists the valid names."""
    found = reproductions()
    if not isinstance(name, str) or name not in found:
        raise ValueError(f"unknown reproduction {name!r}; expected one of {', '.join(found) or '(none)'}")
    return found[name]

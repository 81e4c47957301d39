"""The task registry: ``TASKS``, ``get_task``, ``list_tasks`` and string parsing of parameters for the CLI."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .base import Task
from .copying import Copying, InductionHeads, SelectiveCopy
from .forecast import Forecast
from .images import SDigits, SFashion
from .listops import ListOps
from .params import constraint_text, parse_value, type_name
from .phonebook import Phonebook
from .recall import MQAR, JointRecall
from .text import Text
from .ucr import UCR

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (MQAR, JointRecall, Phonebook, SelectiveCopy, Copying, InductionHeads, ListOps, SDigits, SFashion,
                UCR, Forecast, Text)
}


@dataclass(frozen=True)
class ParamInfo:
    """One task parameter: name, type, default (None with ``required``), help text and constraint."""

    name: str
    type: str
    default: Any
    required: bool
    help: str
    constraint: str
    common: bool


@dataclass(frozen=True)
class TaskInfo:
    """What ``ssmkit tasks`` prints for one task."""

    name: str
    kind: str
    metric: str
    description: str
    params: tuple[ParamInfo, ...]

    def format(self, *, common: bool = False) -> str:
        """Multi-line description; the split-size parameters shared by generated tasks only if ``common``."""
        lines = [f"{self.name}  [{self.kind}, metric: {self.metric}]  {self.description}"]
        for p in self.params:
            if p.common and not common:
                continue
            default = "REQUIRED" if p.required else repr(p.default)
            extra = f"; {p.constraint}" if p.constraint else ""
            lines.append(f"    {p.name} ({p.type}) = {default}: {p.help}{extra}")
        return "\n".join(lines)


def get_task_class(task: str) -> type[Task]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[task]


def get_task(task: str, /, **params: Any) -> Task:
    """Build a task by registry name: ``get_task("mqar", vocab_size=64, seq_len=32)``."""
    return get_task_class(task)(**params)


def _param_infos(cls: type[Task]) -> tuple[ParamInfo, ...]:
    hints = typing.get_type_hints(cls.Params)
    common = set(cls.Params.common_fields)
    infos = []
    for f in fields(cls.Params):
        required = f.default is MISSING
        infos.append(ParamInfo(
            name=f.name, type=type_name(hints[f.name]), default=None if required else f.default, required=required,
            help=f.metadata.get("help", ""), constraint=constraint_text(f.metadata), common=f.name in common,
        ))
    # task-specific parameters first, the shared split sizes last
    return tuple(sorted(infos, key=lambda p: p.common))


def list_tasks() -> list[TaskInfo]:
    """Every registered task with its kind, metric, one-line description and parameters (defaults, help)."""
    return [TaskInfo(name, cls.kind, cls.metric, cls.description, _param_infos(cls)) for name, cls in TASKS.items()]


def format_task_list(*, common: bool = False) -> str:
    """The listing ``ssmkit tasks`` prints."""
    out = "\n\n".join(info.format(common=common) for info in list_tasks())
    if not common:
        out += ("\n\nGenerated tasks (mqar ... listops) also take num_train, num_val, num_test: the number of "
                "examples per split.")
    return out


def parse_task_params(task: str, values: Mapping[str, str]) -> dict[str, Any]:
    """Parse ``{"seq_len": "128", ...}`` strings (from ``--set``) into typed parameter values for ``task``."""
    cls = get_task_class(task)
    hints = typing.get_type_hints(cls.Params)
    valid = [f.name for f in fields(cls.Params)]
    out = {}
    for key, text in values.items():
        if key not in hints:
            raise ValueError(f"{task}: unknown parameter {key!r}; valid parameters: {', '.join(valid)}")
        try:
            out[key] = parse_value(key, text, hints[key])
        except ValueError as e:
            raise ValueError(f"{task}: {e}") from None
    return out

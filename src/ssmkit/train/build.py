"""From raw config sections to live objects: the task, the model spec and the TrainConfig of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..data import Task, get_task, get_task_class
from ..models import SequenceModel, model_class
from .config import TrainConfig
from .presets import ModelSpec, resolve_model

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class RunSetup:
    """A resolved run: the built task, the model spec (preset, head, ModelConfig) and the TrainConfig."""

    task: Task
    model: ModelSpec
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (what RUN_DIR/config.json holds; :func:`resolve_run` rebuilds it)."""
        return {"task": {"name": self.task.name, **self.task.params.to_dict()}, "model": self.model.section(),
                "train": self.train.to_dict()}

    def build_model(self) -> SequenceModel:
        """A freshly initialised model (uses the global torch RNG) in the configured dtype."""
        model = model_class(self.model.head)(self.model.config)
        return model.to(_DTYPES[self.train.dtype])


def resolve_task(section: dict[str, Any]) -> Task:
    """Build the task of a ``task`` section ({"name": ..., **parameters})."""
    section = dict(section)
    name = section.pop("name", None)
    if not name:
        from ..data import TASKS

        raise ValueError(f"no task given (use --task NAME or task.name in the config); valid tasks: "
                         f"{', '.join(TASKS)}")
    for f in dataclasses.fields(get_task_class(name).Params):
        if f.name not in section and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"task {name!r} needs task.{f.name} ({f.metadata.get('help', 'required')}): add "
                             f"--set task.{f.name}=... or put {f.name} in the config's task section")
    return get_task(name, **section)


def resolve_run(sections: dict[str, dict[str, Any]]) -> RunSetup:
    """Validate and build everything a run needs from its raw sections (task, model, train)."""
    task = resolve_task(sections.get("task") or {})
    model = resolve_model(sections.get("model") or {}, task)
    train = TrainConfig.from_dict(dict(sections.get("train") or {}))
    if train.chunk_len is not None and task.kind != "lm":
        raise ValueError(f"train.chunk_len needs a task of kind 'lm' (chunked training splits a per-position "
                         f"loss), but task {task.name!r} is {task.kind!r}")
    return RunSetup(task=task, model=model, train=train)

"""Training: the :class:`Trainer`, its configuration, optimizer and schedule, checkpoints and batch sources.

    from ssmkit.train import Trainer, resolve_run
    setup = resolve_run({"task": {"name": "mqar", "seq_len": 64, "num_pairs": 4},
                         "model": {"preset": "mamba", "d_model": 64},
                         "train": {"steps": 500, "lr": 3e-3}})
    metrics = Trainer(setup, "runs/mqar").train()       # writes metrics, plots, report.md, checkpoints

The same from the shell: ``ssmkit train --task mqar --model mamba --set task.seq_len=64 --run-dir runs/mqar``.
See :mod:`ssmkit.train.config` (sections and ``--set`` overrides), :mod:`ssmkit.train.trainer` (the loop; its
parts: :mod:`~ssmkit.train.steps`, :mod:`~ssmkit.train.evaluation`, :mod:`~ssmkit.train.resume`,
:mod:`~ssmkit.train.interrupts`, :mod:`~ssmkit.train.reporting`), :mod:`ssmkit.train.checkpoints` (atomic
checkpoints and exact resume), :mod:`ssmkit.train.sources` (pluggable batch sources), :mod:`ssmkit.train.presets`
(``--model`` presets) and :mod:`ssmkit.train.chunked` (exact chunked long-sequence training, used when
``train.chunk_len`` is set).
"""

from .activation import disable_activation_checkpointing, enable_activation_checkpointing
from .build import RunSetup, resolve_run, resolve_task
from .checkpoints import ResumeError, latest_checkpoint, read_training_state, save_training_checkpoint
from .config import TrainConfig, apply_overrides, load_config_file
from .optim import LRSchedule, build_optimizer, clip_gradients, no_decay_reason, param_groups
from .presets import PRESETS, ModelSpec, preset_fields, preset_names, resolve_model
from .sources import BatchSource, TaskBatchSource
from .trainer import Trainer, TrainingInterrupted, evaluate_model

__all__ = [
    "PRESETS", "BatchSource", "LRSchedule", "ModelSpec", "ResumeError", "RunSetup", "TaskBatchSource",
    "TrainConfig", "Trainer", "TrainingInterrupted", "apply_overrides", "build_optimizer", "clip_gradients",
    "disable_activation_checkpointing", "enable_activation_checkpointing", "evaluate_model",
    "latest_checkpoint", "load_config_file", "no_decay_reason", "param_groups", "preset_fields",
    "preset_names", "read_training_state", "resolve_model", "resolve_run", "resolve_task",
    "save_training_checkpoint",
]

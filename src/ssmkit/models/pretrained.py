"""Checkpoints by head name: the table of :mod:`ssmkit.models.heads` bound to the low-level
:mod:`ssmkit.models.checkpoint` (which knows no heads).

    save_pretrained(model, directory) -> directory      config.json + model.safetensors, written atomically
    read_config(directory) -> (head name, ModelConfig, metadata)
    load_pretrained(directory, *, expected=None, device=None) -> the head recorded in config.json, eval mode
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from .config import ModelConfig
from .heads import HEADS, SequenceModel, head_name


def save_pretrained(model: SequenceModel, directory: str | Path) -> Path:
    """Write ``model``'s config.json and model.safetensors into ``directory`` (created if needed); returns it.
    ``model`` must be exactly one of the classes in :data:`~ssmkit.models.heads.HEADS`."""
    return save_checkpoint(model, directory, head=head_name(model))


def read_config(directory: str | Path) -> tuple[str, ModelConfig, dict]:
    """Parse and validate ``directory/config.json``: (head name, ModelConfig, the whole metadata dict)."""
    return read_checkpoint_config(directory, HEADS)


def load_pretrained(
    directory: str | Path,
    *,
    expected: type[SequenceModel] | None = None,
    device: torch.device | str | None = None,
) -> SequenceModel:
    """Load a checkpoint written by :func:`save_pretrained`, building the head recorded in config.json.

    ``expected``: the head class the caller wants; a checkpoint of another head fails. The model comes back in
    eval mode, in the saved dtype, on ``device`` (default CPU).
    """
    return load_checkpoint(directory, HEADS, expected=expected, device=device)  # type: ignore[return-value]

"""Tiny runs for the trainer tests (seconds on a busy 2-core machine)."""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.train import RunSetup, resolve_run

TINY_TASK = {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_pairs": 2, "num_train": 64, "num_val": 16,
             "num_test": 16}
TINY_MODEL = {"preset": "mamba", "d_model": 16, "mixer_options": {"mamba": {"d_state": 4}}}


def tiny_setup(
    model: dict[str, Any] | None = None, task: dict[str, Any] | None = None, **train: Any
) -> RunSetup:
    """A 2-layer d_model=16 Mamba on a 16-token MQAR; ``train`` overrides the quiet defaults."""
    defaults = {"steps": 4, "batch_size": 8, "eval_every": 0, "save_every": 0, "log_every": 1,
                "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 16, "plots": False}
    return resolve_run({"task": {**TINY_TASK, **(task or {})}, "model": {**TINY_MODEL, **(model or {})},
                        "train": {**defaults, **train}})


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

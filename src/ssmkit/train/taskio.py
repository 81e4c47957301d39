"""Glue between task batches and model heads: run a model on a batch, weigh and split batches.

``model_outputs(model, task, batch)`` returns what ``task.loss`` / ``task.evaluator()`` expect:

* lm: logits (batch, length, vocab_size) from CausalLM/PrefixLM (``reset`` and ``prefix_mask`` passed on);
* classification: logits (batch, num_classes) from SequenceClassifier (``mask`` becomes ``padding_mask``);
* forecast: (batch, horizon, d) from a Regressor with d_output = horizon * d: its output at the last position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import IGNORE_INDEX, Batch, Task
from ..models import SequenceModel


def model_inputs(model: SequenceModel, batch: Batch) -> Tensor:
    """The batch's ``input_ids``, or its real ``inputs`` cast to the model's parameter dtype."""
    if "input_ids" in batch:
        return batch["input_ids"]
    if "inputs" not in batch:
        raise ValueError(f"batch must hold 'input_ids' or 'inputs', got keys {sorted(batch)}")
    return batch["inputs"].to(model.backbone.param_dtype)


def model_outputs(model: SequenceModel, task: Task, batch: Batch, forward: Callable[..., Any] | None = None) -> Tensor:
    """Run ``model`` on ``batch``; returns the outputs ``task.loss`` takes (see the module docstring).
    ``forward``: what to call instead of ``model`` itself (e.g. its DistributedDataParallel wrapper)."""
    x = model_inputs(model, batch)
    run = model if forward is None else forward
    kw = {}
    if "reset" in batch:
        kw["reset"] = batch["reset"]
    if "prefix_mask" in batch:
        kw["prefix_mask"] = batch["prefix_mask"]
    if task.kind == "lm":
        return run(x, **kw).logits
    if "mask" in batch:
        kw["padding_mask"] = batch["mask"]
    if task.kind == "classification":
        return run(x, **kw).logits
    out = run(x, **kw).outputs  # (batch, length, horizon * d)
    b = out.shape[0]
    return out[:, -1].reshape(b, task.horizon, task.d_output)


def task_loss(task: Task, outputs: Tensor, batch: Batch) -> Tensor:
    """``task.loss(outputs, batch)``; for float64 outputs of the standard cross-entropy tasks the same mean
    cross entropy is computed in float64 (``Task.loss`` computes in float32, which would limit float64
    training to float32 accuracy)."""
    standard = type(task).loss is Task.loss and task.kind in ("lm", "classification")
    if outputs.dtype == torch.float64 and standard:
        labels = batch["labels"].reshape(-1)
        logits = outputs.reshape(labels.numel(), -1)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return task.loss(outputs, batch)


def batch_weight(task: Task, batch: Batch) -> int:
    """Number of scored items in ``batch``: the denominator of the task's mean loss (non-ignored labels for
    lm, rows for classification, label elements for forecasts)."""
    labels = batch["labels"]
    if task.kind == "lm":
        return int((labels != IGNORE_INDEX).sum())
    if task.kind == "classification":
        return int(labels.shape[0])
    return int(labels.numel())


def batch_tokens(batch: Batch) -> int:
    """Input positions in ``batch`` (real positions only when it carries a ``mask``)."""
    if "mask" in batch:
        return int(batch["mask"].sum())
    x = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    return int(x.shape[0] * x.shape[1])


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split every tensor along the batch dim into ``parts`` equal micro-batches."""
    n = next(iter(batch.values())).shape[0]
    if n % parts:
        raise ValueError(f"a batch of {n} examples cannot be split into {parts} equal micro-batches")
    if parts == 1:
        return [batch]
    size = n // parts
    for k, v in batch.items():
        if v.shape[0] != n:
            raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows but the batch has {n}")
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def autocast_context(kind: str, device_type: str = "cpu"):
    """``torch.autocast(device_type, bfloat16)`` for "bf16", else a no-op context.

    Every ssmkit layer supports autocast: its projections run in bfloat16, while convolutions, scans, SSM kernels,
    norms, gates and states stay in float32 (see ``ssmkit.layers.base``); parameters and gradients stay float32."""
    if kind == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

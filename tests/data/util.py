"""Shared helpers for the data tests."""

from __future__ import annotations

import torch

from ssmkit.data import IGNORE_INDEX, Task


def perfect_logits(task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that put all mass on the label wherever one is scored (class 0 elsewhere)."""
    labels = batch["labels"]
    classes = task.vocab_size if task.kind == "lm" else task.num_classes
    target = labels.clamp_min(0)
    logits = torch.full((*labels.shape, classes), -10.0)
    logits.scatter_(-1, target.unsqueeze(-1), 10.0)
    logits[labels == IGNORE_INDEX] = 0.0
    return logits


def assert_batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k

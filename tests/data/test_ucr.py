"""The .ts reader and the ucr task on small files the test writes; the shipped sets when aeon or sktime is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ssmkit.data import get_task, read_ts


def write_ts(path: Path, x: np.ndarray, labels: list[str], *, name: str = "Toy", comment: bool = True) -> None:
    """x: (cases, dims, length)."""
    lines = ["# a test file", "#  with comments"] if comment else []
    lines += [f"@problemName {name}", "@TimeStamps false", "@missing false",
              f"@univariate {'true' if x.shape[1] == 1 else 'false'}", f"@dimensions {x.shape[1]}",
              "@equalLength true", f"@seriesLength {x.shape[2]}",
              f"@classLabel true {' '.join(sorted(set(labels)))}", "@data"]
    for case, lab in zip(x, labels, strict=True):
        lines.append(":".join(",".join(repr(float(v)) for v in dim) for dim in case) + f":{lab}")
    path.write_text("\n".join(lines) + "\n")


def toy_set(tmp_path: Path, dims: int = 2, length: int = 7, subdir: bool = False):
    rng = np.random.default_rng(0)
    base = tmp_path / "Toy" if subdir else tmp_path
    base.mkdir(exist_ok=True)
    sets = {}
    for split, n in (("TRAIN", 20), ("TEST", 6)):
        x = rng.standard_normal((n, dims, length)) * 3 + 5
        labels = [["10", "2", "3"][i % 3] for i in range(n)]
        write_ts(base / f"Toy_{split}.ts", x, labels)
        sets[split] = (x, labels)
    return sets


def test_read_ts_parses_values_labels_and_header(tmp_path):
    sets = toy_set(tmp_path)
    x, y, header = read_ts(tmp_path / "Toy_TRAIN.ts")
    np.testing.assert_array_equal(x, sets["TRAIN"][0])
    assert y.tolist() == sets["TRAIN"][1]
    assert header["timestamps"] == "false" and header["problemname"] == "Toy"


def test_read_ts_errors(tmp_path):
    p = tmp_path / "bad.ts"
    p.write_text("@problemName x\n@classLabel true a b\n@data\n1,2,3:a\n1,2:b\n")
    with pytest.raises(ValueError, match="unequal-length series are not supported"):
        read_ts(p)
    p.write_text("@classLabel true a b\n@data\n1,2,3:a\n1,x,3:b\n")
    with pytest.raises(ValueError, match=r"bad.ts:4: non-numeric value"):
        read_ts(p)
    p.write_text("@classLabel true a b\n@data\n1,2,3:c\n")
    with pytest.raises(ValueError, match=r"labels \['c'\] are not in the declared"):
        read_ts(p)
    p.write_text("@timeStamps true\n@classLabel true a\n@data\n(0,1),(1,2):a\n")
    with pytest.raises(ValueError, match="time-stamped"):
        read_ts(p)
    p.write_text("@classLabel true a\n@data\n1,?,3:a\n")
    x, _, _ = read_ts(p)
    assert np.isnan(x[0, 0, 1]) and x[0, 0, 2] == 3.0


@pytest.mark.parametrize("subdir", [False, True])
def test_ucr_task_from_local_files(tmp_path, subdir):
    sets = toy_set(tmp_path, subdir=subdir)
    task = get_task("ucr", dataset="Toy", path=str(tmp_path), val_fraction=0.25, normalize=False)
    assert task.class_names == ("2", "3", "10")  # numeric labels sort numerically
    assert (task.d_input, task.max_length, task.num_classes) == (2, 7, 3)
    assert [task.num_examples(s) for s in task.splits] == [15, 5, 6]
    test = next(task.batches("test", 6))
    assert test["inputs"].shape == (6, 7, 2) and test["inputs"].dtype == torch.float32
    x, labels = sets["TEST"]
    np.testing.assert_allclose(test["inputs"].numpy(), x.transpose(0, 2, 1), rtol=1e-6)
    assert [task.class_names[i] for i in test["labels"].tolist()] == labels
    normed = get_task("ucr", dataset="Toy", path=str(tmp_path), val_fraction=0.25)
    train = torch.cat([b["inputs"] for s in ("train",) for b in normed.batches(s, 64)])
    assert train.mean((0, 1)).abs().max() < 0.2 and (train.std((0, 1)) - 1).abs().max() < 0.2


def test_ucr_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Nope_TRAIN.ts"):
        get_task("ucr", dataset="Nope", path=str(tmp_path))
    p = tmp_path / "Miss_TRAIN.ts"
    p.write_text("@classLabel true a b\n@data\n1,?,3:a\n1,2,3:b\n")
    (tmp_path / "Miss_TEST.ts").write_text("@classLabel true a b\n@data\n1,2,3:a\n")
    with pytest.raises(ValueError, match="missing values"):
        get_task("ucr", dataset="Miss", path=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("aeon") is None and importlib.util.find_spec("sktime") is None,
                    reason="neither aeon nor sktime is installed (pip install sktime)")
def test_ucr_real_sets_from_aeon_or_sktime():
    task = get_task("ucr", dataset="GunPoint")
    assert (task.max_length, task.d_input, task.num_classes) == (150, 1, 2)
    assert task.num_examples("train") + task.num_examples("val") == 50 and task.num_examples("test") == 150
    acsf = get_task("ucr", dataset="ACSF1")
    assert acsf.max_length == 1460 and acsf.num_classes == 10


@pytest.mark.skipif(importlib.util.find_spec("aeon") is not None or importlib.util.find_spec("sktime") is None,
                    reason="the sktime path runs when sktime is installed and aeon is not")
def test_ucr_sktime_never_downloads_a_set_it_does_not_ship():
    from ssmkit.data import MissingDataError

    with pytest.raises(MissingDataError, match="does not ship dataset='Coffee'.*GunPoint"):
        get_task("ucr", dataset="Coffee")

"""The SSM classifier: patch stem and pooling shapes, the stratified validation split, the validation choice,
seed ensembles on a separable toy set, padding of unequal-length sets, and one-line config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.timeseries.classify import (
    ClassifierConfig,
    SSMClassifier,
    ensemble_accuracy,
    select_config,
    stratified_split,
)
from ssmkit.timeseries.datasets import pad_cases


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("pool", "patch"), [("mean", 1), ("meanmax", 4)])
def test_classifier_shapes(pool, patch):
    clf = SSMClassifier(3, 5, d_model=8, n_layers=1, pool=pool, patch=patch)
    assert clf(torch.randn(2, 21, 3)).shape == (2, 5)
    with pytest.raises(ValueError, match="x must be"):
        clf(torch.randn(2, 21, 2))


def test_patch_for_keeps_tokens_under_the_limit():
    cfg = ClassifierConfig(patch=0, max_tokens=128)
    assert [cfg.patch_for(n) for n in (24, 128, 129, 1460)] == [1, 1, 2, 12]
    assert ClassifierConfig(patch=3).patch_for(1460) == 3
    with pytest.raises(ValueError, match="kind='lstm' is invalid"):
        ClassifierConfig(kind="lstm")
    with pytest.raises(ValueError, match="pool='max' is invalid"):
        ClassifierConfig(pool="max")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=40), st.floats(0.1, 0.6), st.integers(0, 5))
def test_stratified_split_partitions_every_class(labels, fraction, seed):
    y = np.array([f"c{v}" for v in labels])
    fit, val = stratified_split(y, fraction, seed)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(y)))
    for c in set(y.tolist()):
        n, held = int((y == c).sum()), int((y[val] == c).sum())
        assert held == (0 if n < 2 else max(1, round(fraction * n)))
        assert held < n or n == 0


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: a rising or a falling ramp, plus noise; (cases, 1, 16)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ramp = np.linspace(-1, 1, 16)
    x = np.where(y[:, None] == 1, ramp, -ramp)[:, None, :] + rng.normal(0, 0.3, (n, 1, 16))
    return x, np.array(["up" if v else "down" for v in y])


def test_choice_and_ensemble_on_a_separable_toy_set():
    train, test = _toy(40, 0), _toy(60, 1)
    cands = {"none": ClassifierConfig(d_model=8, n_layers=1, steps=1, lr=1e-6),
             "trained": ClassifierConfig(d_model=8, n_layers=1, steps=40, lr=1e-2)}
    choice, val = select_config(train, cands)
    assert set(val) == set(cands) and all(0 <= v <= 1 and (10 * v).is_integer() for v in val.values())
    assert choice == max(val, key=val.__getitem__) and val["trained"] == 1.0
    per_seed, ens = ensemble_accuracy(train, test, cands["trained"], [0, 1])
    assert len(per_seed) == 2 and min(per_seed) >= 0.95 and ens >= 0.95


def test_pad_cases_repeats_the_last_value():
    out = pad_cases([np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0], [6.0]])], 3)
    np.testing.assert_array_equal(out, [[[1, 2, 2], [3, 4, 4]], [[5, 5, 5], [6, 6, 6]]])
    with pytest.raises(ValueError, match="1..1 steps"):
        pad_cases([np.zeros((1, 2))], 1)

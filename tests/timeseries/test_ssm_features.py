"""Random S4D features with a ridge classifier: the filter bank against a direct convolution with the layers'
kernels, both directions, the feature layout, determinism per seed, the ridge scores on a separable toy set,
its place among the classifier recipes, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssmkit.timeseries.classify import select_config, with_steps
from ssmkit.timeseries.ssm_features import FeatureConfig, SSMFeatures, ridge_scores


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(n: int, seed: int, length: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: a bump early or late in the series, plus noise; (cases, 2, length)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    t = np.arange(length)
    centre = np.where(y == 1, 0.75 * length, 0.25 * length)[:, None]
    bump = np.exp(-0.5 * ((t - centre) / 2.0) ** 2)
    x = np.stack([bump, -bump], 1) + rng.normal(0, 0.2, (n, 2, length))
    return x, np.array(["late" if v else "early" for v in y])


def test_filters_equal_a_direct_convolution_both_ways():
    cfg = FeatureConfig(n_kernels=6, d_state=4, biases=2)
    x = _toy(5, 0)[0]
    feats = SSMFeatures(cfg, seed=3).fit(x)
    z = feats._prep(x)  # (cases, length, 2 * channels): the z-scored channels, then their differences
    assert z.shape == (5, 24, 4)
    y = feats._filter(z).double()
    length = z.shape[1]
    for half, layer in enumerate(feats.layers):
        k = layer.kernel(length).double().detach()
        d = layer.D.double().detach()
        for j in range(3):
            u = z[:, :, feats.pick[3 * half + j]].double()
            if layer.reverse:  # anti-causal: y_t = sum_l K_l u_{t+l}
                want = torch.stack([(k[j, :length - t] * u[:, t:]).sum(1) for t in range(length)], 1)
            else:
                want = torch.stack([(k[j, :t + 1].flip(0) * u[:, :t + 1]).sum(1) for t in range(length)], 1)
            torch.testing.assert_close(y[:, :, 3 * half + j], want + d[j] * u, atol=1e-4, rtol=1e-4)


def test_feature_layout_and_determinism():
    cfg = FeatureConfig(n_kernels=8, biases=3)
    x = _toy(6, 1)[0]
    a = SSMFeatures(cfg, seed=0).fit(x).transform(x)
    assert a.shape == (6, 8 * 4) and np.isfinite(a).all()
    ppv = a[:, :24]
    assert ((ppv >= 0) & (ppv <= 1)).all()
    np.testing.assert_array_equal(a, SSMFeatures(cfg, seed=0).fit(x).transform(x, batch=4))
    assert not np.allclose(a, SSMFeatures(cfg, seed=1).fit(x).transform(x))


def test_long_cases_are_pooled():
    cfg = FeatureConfig(n_kernels=4, biases=1, max_length=10)
    x = np.random.default_rng(0).normal(size=(3, 1, 35))
    assert SSMFeatures(cfg).fit(x)._prep(x).shape == (3, 9, 2)  # ceil(35 / 4) steps


def test_ridge_scores_separate_a_toy_set_and_follow_the_class_order():
    train, test = _toy(40, 0), _toy(40, 1)
    cfg = FeatureConfig(n_kernels=64, biases=2)
    p = ridge_scores(train, test[0], ["late", "early"], cfg)
    assert p.shape == (40, 2)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.mean(np.array(["late", "early"])[p.argmax(1)] == test[1]) >= 0.95
    choice, val = select_config(train, {"ridge": cfg})
    assert choice == "ridge" and val["ridge"] >= 0.9
    assert with_steps(cfg, 5) is cfg  # not trained: no steps to override


def test_errors():
    with pytest.raises(ValueError, match="n_kernels must be even"):
        FeatureConfig(n_kernels=5)
    with pytest.raises(RuntimeError, match="call fit first"):
        SSMFeatures(FeatureConfig(n_kernels=4)).transform(np.zeros((1, 1, 8)))
    with pytest.raises(ValueError, match=r"x must be \(cases, channels, length >= 3\)"):
        SSMFeatures(FeatureConfig(n_kernels=4)).fit(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="cover exactly the given classes"):
        ridge_scores(_toy(10, 0), _toy(4, 1)[0], ["early", "late", "other"], FeatureConfig(n_kernels=4))

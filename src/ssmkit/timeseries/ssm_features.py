"""Random S4D features and a ridge classifier: ROCKET's recipe with random diagonal SSM kernels in place of
random dilated convolutions.

Each of ``n_kernels`` channels of a fixed (untrained) :class:`ssmkit.layers.S4D` layer (``output='none'``,
half of them ``reverse=True``, so every position sees both sides) filters one input channel: a random
z-normalised channel of the case or its first difference. Its step size Δ is log-uniform in
[``dt_min``, ``dt_max``] (memories from ~1 step to ~the length), its ``d_state/2`` modes take random
frequencies, and C and D are random. Per kernel output y (length,) the features are, as in MiniRocket and
ROCKET, the proportion of positive values PPV(y - b) for ``biases`` biases b (quantiles of y on random training
cases) and max(y). sklearn's RidgeClassifierCV (standardised features, alpha by leave-one-out) classifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.base import require_module
from ..layers import S4D


@dataclass(frozen=True)
class FeatureConfig:
    n_kernels: int = 2000
    d_state: int = 4
    dt_min: float = 0.01
    dt_max: float = 1.0
    biases: int = 4
    max_length: int = 512  # longer cases are average-pooled to at most this many steps first

    def __post_init__(self) -> None:
        if self.n_kernels < 2 or self.n_kernels % 2 or self.biases < 1 or self.max_length < 2:
            raise ValueError(f"FeatureConfig: n_kernels must be even and >= 2, biases >= 1, max_length >= 2, "
                             f"got {self}")


class SSMFeatures:
    """fit(x) draws the kernels and biases; transform(x) -> features (cases, n_kernels * (biases + 1)).

    x: (cases, channels, length) float64, z-normalised per case and channel inside.
    """

    def __init__(self, cfg: FeatureConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed

    def _prep(self, x: np.ndarray) -> torch.Tensor:
        if x.ndim != 3 or x.shape[2] < 3:
            raise ValueError(f"SSMFeatures: x must be (cases, channels, length >= 3), got {x.shape}")
        t = torch.tensor(x, dtype=torch.float32)
        pool = math.ceil(t.shape[2] / self.cfg.max_length)
        if pool > 1:
            t = torch.nn.functional.avg_pool1d(t, pool, pool, ceil_mode=True)
        t = (t - t.mean(2, keepdim=True)) / t.std(2, keepdim=True).clamp(min=1e-8)
        d = torch.diff(t, dim=2, prepend=t[:, :, :1])
        d = d / d.std(2, keepdim=True).clamp(min=1e-8)
        return torch.cat([t, d], 1).transpose(1, 2)  # (cases, length, 2 * channels)

    def fit(self, x: np.ndarray) -> SSMFeatures:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        half = cfg.n_kernels // 2
        self.layers = [S4D(half, cfg.d_state, init="lin", output="none", dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                           reverse=r, mode="conv") for r in (False, True)]
        with torch.no_grad():
            for layer in self.layers:  # random mode frequencies up to Nyquist, random decay
                dt = torch.exp(layer.log_dt)[:, None]
                layer.A_im.copy_(torch.rand(layer.A_im.shape, generator=gen) * math.pi / dt)
                layer.A_log_re.copy_(torch.log(torch.rand(layer.A_log_re.shape, generator=gen) * 0.9 + 0.1))
                layer.D.mul_(0.1)
        z = self._prep(x)
        self.pick = torch.randint(z.shape[2], (cfg.n_kernels,), generator=gen)
        y = self._filter(z[torch.randint(len(z), (min(len(z), 32),), generator=gen)])  # (cases, length, kernels)
        q = torch.rand(cfg.n_kernels, cfg.biases, generator=gen) * 0.8 + 0.1
        case = torch.randint(len(y), (cfg.n_kernels,), generator=gen)
        rows = y[case, :, torch.arange(cfg.n_kernels)]  # (kernels, length): one training case per kernel
        self.bias = torch.stack([torch.quantile(rows[k], q[k]) for k in range(cfg.n_kernels)])
        return self

    def _filter(self, z: torch.Tensor) -> torch.Tensor:
        u = z[:, :, self.pick]  # (cases, length, kernels)
        half = self.cfg.n_kernels // 2
        with torch.no_grad():
            return torch.cat([self.layers[0](u[..., :half]), self.layers[1](u[..., half:])], -1)

    def transform(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        if not hasattr(self, "bias"):
            raise RuntimeError("SSMFeatures.transform: call fit first")
        z = self._prep(x)
        out = []
        for i in range(0, len(z), batch):
            y = self._filter(z[i:i + batch])  # (b, length, kernels)
            # share of positive values per (kernel, bias): one (b, length, kernels) mask at a time, not all biases
            ppv = torch.stack([(y > bias).sum(1) for bias in self.bias.unbind(1)], -1).to(y.dtype) / y.shape[1]
            out.append(torch.cat([ppv.flatten(1), y.amax(1)], 1))
        return torch.cat(out).double().numpy()


def ridge_scores(train: tuple[np.ndarray, np.ndarray], x_eval: np.ndarray, classes: list[str], cfg: FeatureConfig,
                 seed: int = 0) -> np.ndarray:
    """Random S4D features (seed ``seed``) and sklearn's RidgeClassifierCV fitted on ``train``: softmax of its
    decision scores on ``x_eval``, (cases, classes) in the order of ``classes``."""
    linear = require_module("sklearn.linear_model", task="ssm ridge classifier", pip="scikit-learn")
    pre = require_module("sklearn.preprocessing", task="ssm ridge classifier", pip="scikit-learn")
    if sorted(set(train[1].tolist())) != sorted(classes):
        raise ValueError("ridge_scores: the training labels must cover exactly the given classes")
    feats = SSMFeatures(cfg, seed).fit(train[0])
    scaler = pre.StandardScaler()
    ft = scaler.fit_transform(feats.transform(train[0]))
    clf = linear.RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)).fit(ft, train[1])
    d = clf.decision_function(scaler.transform(feats.transform(x_eval)))
    d = np.stack([-d, d], 1) if d.ndim == 1 else d
    d = d[:, [list(clf.classes_).index(c) for c in classes]]
    e = np.exp(d - d.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

"""The bidirectional SSM classifier, its training recipe, validation choice and seed ensembles.

Arrays X are (cases, channels, length) float64 and labels str, as :func:`.datasets.load_classification` gives
them. Every choice here (config, checkpoint) is made on a stratified validation split of the *training* cases;
the test split is only predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import S4D, Bidirectional, Mamba
from .ssm_features import FeatureConfig, ridge_scores


@dataclass(frozen=True)
class ClassifierConfig:
    """One recipe. ``patch``: the stem is a Conv1d with kernel = stride = patch (0: the smallest patch that
    leaves <= ``max_tokens`` tokens); ``pool``: 'mean' or 'meanmax' (mean and max over time, concatenated);
    ``augment``: random crop-and-resize to 80-100% of the length, amplitude scaling and jitter while training."""

    kind: str = "s4d"
    d_model: int = 64
    n_layers: int = 2
    pool: str = "mean"
    patch: int = 1
    max_tokens: int = 256
    dropout: float = 0.0
    augment: bool = False
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if self.kind not in ("s4d", "mamba"):
            raise ValueError(f"ClassifierConfig: kind={self.kind!r} is invalid: expected 's4d' or 'mamba'")
        if self.pool not in ("mean", "meanmax"):
            raise ValueError(f"ClassifierConfig: pool={self.pool!r} is invalid: expected 'mean' or 'meanmax'")
        if self.patch < 0 or self.steps < 1 or self.d_model < 1 or self.n_layers < 1:
            raise ValueError(f"ClassifierConfig: patch must be >= 0 and steps, d_model, n_layers >= 1, got {self}")

    def patch_for(self, length: int) -> int:
        return self.patch if self.patch else max(1, math.ceil(length / self.max_tokens))


#: a recipe: a trained classifier, or random S4D features with a ridge classifier (:mod:`.ssm_features`)
Recipe = ClassifierConfig | FeatureConfig


class SSMClassifier(nn.Module):
    """Conv1d patch stem, bidirectional S4D or Mamba blocks (pre-norm residual), pooling over time, a linear
    classifier: (batch, length, channels) -> logits (batch, classes)."""

    def __init__(self, channels: int, classes: int, d_model: int = 64, n_layers: int = 2, kind: str = "s4d",
                 pool: str = "mean", patch: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.channels, self.pool, self.patch = channels, pool, patch
        self.embed = nn.Conv1d(channels, d_model, kernel_size=patch, stride=patch)
        make = (lambda: S4D(d_model, d_state=32)) if kind == "s4d" else (lambda: Mamba(d_model, d_state=16, expand=1))
        self.layers = nn.ModuleList(Bidirectional(make()) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers + 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model * (2 if pool == "meanmax" else 1), classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.channels or x.shape[1] < self.patch:
            raise ValueError(f"SSMClassifier: x must be (batch, length >= {self.patch}, {self.channels}), "
                             f"got {tuple(x.shape)}")
        h = self.embed(x.transpose(1, 2)).transpose(1, 2)
        for layer, norm in zip(self.layers, self.norms, strict=False):
            h = h + self.drop(layer(norm(h)))
        h = self.norms[-1](h)
        pooled = h.mean(1) if self.pool == "mean" else torch.cat([h.mean(1), h.amax(1)], dim=-1)
        return self.head(self.drop(pooled))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Crop 80-100% of the length at a random place and resize it back, scale by U(0.9, 1.1), add N(0, 0.05)."""
    b, length, c = x.shape
    keep = max(2, int(length * float(0.8 + 0.2 * torch.rand((), generator=gen))))
    start = int(torch.randint(length - keep + 1, (), generator=gen))
    crop = x[:, start:start + keep].transpose(1, 2)
    out = nn.functional.interpolate(crop, size=length, mode="linear", align_corners=True).transpose(1, 2)
    scale = 0.9 + 0.2 * torch.rand(b, 1, c, generator=gen)
    return out * scale + 0.05 * torch.randn(out.shape, generator=gen)


def _prep(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tensor:
    return torch.tensor(((x - mean) / std).transpose(0, 2, 1), dtype=torch.float32)


def fit_predict(train: tuple[np.ndarray, np.ndarray], x_eval: np.ndarray, classes: list[str], cfg: Recipe,
                seed: int) -> np.ndarray:
    """Train on ``train`` (z-normalised per channel by its statistics) and return class probabilities of
    ``x_eval``, (cases, classes) float64, classes in the order of ``classes``. A :class:`FeatureConfig`
    recipe returns the softmax of the ridge classifier's scores instead (:func:`.ssm_features.ridge_scores`)."""
    if isinstance(cfg, FeatureConfig):
        return ridge_scores(train, x_eval, classes, cfg, seed)
    index = {c: i for i, c in enumerate(classes)}
    mean = train[0].mean(axis=(0, 2), keepdims=True)
    std = np.where((s := train[0].std(axis=(0, 2), keepdims=True)) > 0, s, 1.0)
    xt, xe = _prep(train[0], mean, std), _prep(x_eval, mean, std)
    yt = torch.tensor([index[c] for c in train[1]])
    torch.manual_seed(seed)
    model = SSMClassifier(xt.shape[2], len(classes), cfg.d_model, cfg.n_layers, cfg.kind, cfg.pool,
                          cfg.patch_for(xt.shape[1]), cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        model.train()
        idx = torch.randint(len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
        xb = _augment(xt[idx], gen) if cfg.augment else xt[idx]
        loss = nn.functional.cross_entropy(model(xb), yt[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xe[i:i + 64]) for i in range(0, len(xe), 64)])
    return torch.softmax(logits.double(), -1).numpy()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): ``fraction`` of each class (at least one case when the class has
    two or more) held out at random."""
    if not 0 < fraction < 1:
        raise ValueError(f"stratified_split: fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) >= 2:
            val.extend(idx[:max(1, int(round(fraction * len(idx))))].tolist())
    val_idx = np.array(sorted(val), dtype=int)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def select_config(train: tuple[np.ndarray, np.ndarray], candidates: dict[str, Recipe],
                  fraction: float = 0.25, seed: int = 0) -> tuple[str, dict[str, float]]:
    """The candidate with the highest accuracy on a stratified validation split of ``train`` (ties: the first
    listed), and every candidate's validation accuracy."""
    if not candidates:
        raise ValueError("select_config: candidates must not be empty")
    classes = sorted(set(train[1].tolist()))
    fit, val = stratified_split(train[1], fraction, seed)
    scores = {}
    for name, cfg in candidates.items():
        prob = fit_predict((train[0][fit], train[1][fit]), train[0][val], classes, cfg, seed)
        scores[name] = float(np.mean(np.array(classes)[prob.argmax(1)] == train[1][val]))
    return max(scores, key=scores.__getitem__), scores


def ensemble_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      cfg: Recipe, seeds: list[int]) -> tuple[list[float], float]:
    """(test accuracy of each seed, test accuracy of the seeds' mean probabilities)."""
    classes = sorted(set(train[1].tolist()))
    probs = [fit_predict(train, test[0], classes, cfg, s) for s in seeds]
    acc = [float(np.mean(np.array(classes)[p.argmax(1)] == test[1])) for p in probs]
    return acc, float(np.mean(np.array(classes)[np.mean(probs, 0).argmax(1)] == test[1]))


def with_steps(cfg: Recipe, steps: int) -> Recipe:
    """``cfg`` with ``steps`` training steps (a :class:`FeatureConfig` is not trained: returned as is)."""
    return cfg if isinstance(cfg, FeatureConfig) else replace(cfg, steps=steps)

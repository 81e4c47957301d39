"""Gaussian prediction intervals for any point forecaster, and their seed-ensemble mixture.

:class:`GaussianHead` adds a scale net to a trained-together point forecaster: sigma (batch, horizon, variates)
= softplus(Linear_{context -> horizon}(window z-scores)) * window std * ``calibration``. It is trained with the
Gaussian negative log-likelihood on the *detached* point forecast, so the NLL sends no gradient to the point
forecaster (only the shared gradient-norm clipping couples them); afterwards one scalar ``calibration`` is
fitted on the validation windows (the windows before the first forecast origin that choose the checkpoint) so
that E[(y - mean)^2 / sigma^2] = 1 there: training windows are fitted better than unseen ones, and an
uncalibrated sigma would be too narrow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

#: z of the central 80% interval of a normal distribution
Z80 = 1.2815515655446004


class GaussianHead(nn.Module):
    """``forward(x)`` is the inner point forecast; ``dist(x)`` returns (mean, sigma), both
    (batch, horizon, variates). ``inner`` needs ``context``, ``horizon`` and ``variates`` attributes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.context, self.horizon, self.variates = inner.context, inner.horizon, inner.variates
        self.scale = nn.Linear(self.context, self.horizon)
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, math.log(math.expm1(0.5)))  # softplus -> 0.5 window stds
        self.register_buffer("calibration", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def sigma(self, x: Tensor) -> Tensor:
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False).clamp(min=1e-5)
        s = nn.functional.softplus(self.scale(((x - mean) / std).transpose(1, 2))).transpose(1, 2)
        return (s + 1e-3) * std * self.calibration

    def dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner(x), self.sigma(x)

    def loss(self, x: Tensor, y: Tensor, point: str = "mse") -> Tensor:
        """MSE (``point='mse'``) or MAE (``'mae'``) of the point forecast plus the Gaussian NLL of the scale net
        around the detached forecast."""
        if point not in ("mse", "mae"):
            raise ValueError(f"GaussianHead.loss: point={point!r} is invalid: expected 'mse' or 'mae'")
        mean, sigma = self.dist(x)
        nll = nn.functional.gaussian_nll_loss(mean.detach(), y, sigma ** 2, full=True)
        fit = nn.functional.mse_loss(mean, y) if point == "mse" else nn.functional.l1_loss(mean, y)
        return fit + nll

    @torch.no_grad()
    def calibrate(self, x: Tensor, y: Tensor) -> float:
        """Scale sigma so the mean squared standardised residual on (x, y) is 1; returns the factor."""
        self.calibration.fill_(1.0)
        mean, sigma = self.dist(x)
        factor = float(torch.sqrt(((y - mean) / sigma).pow(2).mean()))
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"GaussianHead.calibrate: the calibration factor is {factor}; check the windows")
        self.calibration.fill_(factor)
        return factor


def mixture(means: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the equal-weight mixture of Gaussians N(means[k], sigmas[k]^2) over axis 0 (moment
    matching: var = mean_k(sigma_k^2 + mean_k^2) - mean^2)."""
    m, s = np.asarray(means, dtype=np.float64), np.asarray(sigmas, dtype=np.float64)
    if m.shape != s.shape or m.ndim < 1 or len(m) == 0:
        raise ValueError(f"mixture: means {m.shape} and sigmas {s.shape} must have one equal non-empty shape")
    mu = m.mean(0)
    return mu, np.sqrt(np.maximum((s ** 2 + m ** 2).mean(0) - mu ** 2, 0.0))


def coverage(lower: np.ndarray, upper: np.ndarray, actual: np.ndarray) -> float:
    """Share of ``actual`` inside [lower, upper] (equal shapes)."""
    lo, up, a = (np.asarray(v, dtype=np.float64) for v in (lower, upper, actual))
    if not lo.shape == up.shape == a.shape or a.size == 0:
        raise ValueError(f"coverage: lower {lo.shape}, upper {up.shape}, actual {a.shape} must be equal, non-empty")
    return float(((a >= lo) & (a <= up)).mean())

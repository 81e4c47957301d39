"""Timescale (Δ) initialisation: log-uniform in [dt_min, dt_max], as in S4, S4D and Mamba."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_dt_range(owner: str, dt_min: object, dt_max: object) -> tuple[float, float]:
    """0 < dt_min <= dt_max, both real numbers."""
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dt_min, dt_max))
    if not ok or not 0.0 < dt_min <= dt_max:  # type: ignore[operator]
        raise ValueError(
            f"{owner}: dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min!r}, {dt_max!r}"
        )
    return float(dt_min), float(dt_max)  # type: ignore[arg-type]


def log_uniform_dt(
    n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, *, generator: torch.Generator | None = None
) -> Tensor:
    """n timescales drawn log-uniformly in [dt_min, dt_max]: (n,) float64."""
    dt_min, dt_max = check_dt_range("log_uniform_dt", dt_min, dt_max)
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    return torch.exp(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))


def inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y for y > 0 (accurate for small and large y): x = y + log(−expm1(−y))."""
    return y + torch.log(-torch.expm1(-y))

"""Forecasters built from ssmkit's layers, plus DLinear (a linear baseline); the classifier is in :mod:`.classify`.

Every forecaster maps a context (batch, context, variates) to a forecast (batch, horizon, variates). The SSM
forecasters normalise each window by its own mean and std over time and undo it on the output (RevIN without
the affine part), as SpaceTime and S-Mamba do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import S4D, Bidirectional, Mamba
from .companion import CompanionSSM


def _check(name: str, x: Tensor, context: int, variates: int) -> None:
    if x.ndim != 3 or x.shape[1:] != (context, variates):
        raise ValueError(f"{name}: x must be (batch, {context}, {variates}), got {tuple(x.shape)}")


def seasonal_naive(x: Tensor, season: int, horizon: int) -> Tensor:
    """The last ``season`` steps of x (batch, context, variates) repeated to (batch, horizon, variates)."""
    idx = x.shape[1] - season + torch.arange(horizon, device=x.device) % season
    return x[:, idx]


def seasonal_profile(x: Tensor, season: int, horizon: int) -> Tensor:
    """The mean of each phase over the k = context // season most recent whole seasons of x (batch, context,
    variates), repeated to (batch, horizon, variates): seasonal naive averaged over k seasons (k = 1: equal)."""
    k = x.shape[1] // season
    prof = x[:, x.shape[1] - k * season:].reshape(x.shape[0], k, season, x.shape[2]).mean(1)
    return prof[:, torch.arange(horizon, device=x.device) % season]


class _WindowNorm(nn.Module):
    """Standardise each window over time; ``undo`` maps outputs back."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False).clamp(min=1e-5)
        return (x - mean) / std, mean, std


class _Forecaster(nn.Module):
    """Shared output rule: a correction scaled by the window std, added to the window mean, or, once
    ``season`` is set (by :class:`SeasonalResidual`), to the seasonal-naive forecast of the window (with
    ``profile``: to its :func:`seasonal_profile`)."""

    season: int = 0
    profile: bool = False

    def _base(self, x: Tensor, mean: Tensor) -> Tensor:
        if not self.season:
            return mean
        return (seasonal_profile if self.profile else seasonal_naive)(x, self.season, self.horizon)

    def output_layers(self) -> list[nn.Linear]:
        """The last Linear layers before the output rule (all zeroed, the forecaster returns exactly its base)."""
        if isinstance(getattr(self, "out", None), nn.Sequential):
            return [self.out[-1]]
        return [self.trend, self.seasonal] if isinstance(self, DLinear) else [self.head]


class SpaceTime(_Forecaster):
    """Companion-SSM encoder layers, then a closed-loop companion SSM that rolls the forecast forward.

    Encoder layer: x + Linear(GELU(CompanionSSM(LayerNorm(x)))). Decoder: the closed-loop layer's state at the
    end of the encoded context, rolled ``horizon`` steps (:meth:`CompanionSSM.closed_loop`), then Linear to the
    variates.
    """

    def __init__(self, context: int, horizon: int, variates: int, d_model: int = 64, d_state: int = 32,
                 n_layers: int = 2) -> None:
        super().__init__()
        self.context, self.horizon, self.variates = context, horizon, variates
        self.norm = _WindowNorm()
        self.embed = nn.Linear(variates, d_model)
        self.ssms = nn.ModuleList(CompanionSSM(d_model, d_state) for _ in range(n_layers))
        self.mixes = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.decoder = CompanionSSM(d_model, d_state)
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, variates))

    def forward(self, x: Tensor) -> Tensor:
        _check("SpaceTime", x, self.context, self.variates)
        z, mean, std = self.norm(x)
        h = self.embed(z)
        for ssm, mix, norm in zip(self.ssms, self.mixes, self.norms, strict=True):
            h = h + mix(nn.functional.gelu(ssm(norm(h))))
        y, _ = self.decoder.closed_loop(self.decoder.final_state(h), self.horizon)
        return self.out(y) * std + self._base(x, mean)


class SMamba(_Forecaster):
    """S-Mamba: each variate's whole context is one token; a bidirectional Mamba mixes the variate tokens,
    an MLP mixes along each token (time), and a linear head maps a token to its horizon."""

    def __init__(self, context: int, horizon: int, variates: int, d_model: int = 64, d_state: int = 16,
                 n_layers: int = 2) -> None:
        super().__init__()
        self.context, self.horizon, self.variates = context, horizon, variates
        self.norm = _WindowNorm()
        self.embed = nn.Linear(context, d_model)
        self.mixers = nn.ModuleList(Bidirectional(Mamba(d_model, d_state=d_state, expand=1))
                                    for _ in range(n_layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                                nn.Linear(2 * d_model, d_model)) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(2 * n_layers))
        self.head = nn.Linear(d_model, horizon)

    def forward(self, x: Tensor) -> Tensor:
        _check("SMamba", x, self.context, self.variates)
        z, mean, std = self.norm(x)
        h = self.embed(z.transpose(1, 2))  # (batch, variates, d_model): one token per variate
        for i, (mixer, mlp) in enumerate(zip(self.mixers, self.mlps, strict=True)):
            h = self.norms[2 * i](h + mixer(h))
            h = self.norms[2 * i + 1](h + mlp(h))
        return self.head(h).transpose(1, 2) * std + self._base(x, mean)


class SeqForecaster(_Forecaster):
    """A causal stack of Mamba or S4D blocks (pre-norm residual) over time; the last position's hidden
    state maps linearly to the whole horizon."""

    def __init__(self, context: int, horizon: int, variates: int, kind: str = "mamba", d_model: int = 64,
                 n_layers: int = 2) -> None:
        super().__init__()
        if kind not in ("mamba", "s4d"):
            raise ValueError(f"SeqForecaster: kind={kind!r} is invalid: expected 'mamba' or 's4d'")
        self.context, self.horizon, self.variates = context, horizon, variates
        self.norm = _WindowNorm()
        self.embed = nn.Linear(variates, d_model)
        make = (lambda: Mamba(d_model, d_state=16)) if kind == "mamba" else (lambda: S4D(d_model, d_state=32))
        self.layers = nn.ModuleList(make() for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers + 1))
        self.head = nn.Linear(d_model, horizon * variates)

    def forward(self, x: Tensor) -> Tensor:
        _check("SeqForecaster", x, self.context, self.variates)
        z, mean, std = self.norm(x)
        h = self.embed(z)
        for layer, norm in zip(self.layers, self.norms, strict=False):
            h = h + layer(norm(h))
        y = self.head(self.norms[-1](h[:, -1])).view(-1, self.horizon, self.variates)
        return y * std + self._base(x, mean)


class DLinear(_Forecaster):
    """DLinear: a moving-average trend and the seasonal remainder, each mapped to the horizon by one Linear
    shared across variates (kernel 25, or the largest odd size <= context)."""

    def __init__(self, context: int, horizon: int, variates: int, kernel: int = 25) -> None:
        super().__init__()
        self.context, self.horizon, self.variates = context, horizon, variates
        self.kernel = min(kernel, context if context % 2 else context - 1)
        self.trend = nn.Linear(context, horizon)
        self.seasonal = nn.Linear(context, horizon)

    def forward(self, x: Tensor) -> Tensor:
        _check("DLinear", x, self.context, self.variates)
        pad = (self.kernel - 1) // 2
        xt = x.transpose(1, 2)  # (batch, variates, context)
        padded = torch.cat([xt[..., :1].expand(-1, -1, pad), xt, xt[..., -1:].expand(-1, -1, pad)], dim=-1)
        trend = nn.functional.avg_pool1d(padded, self.kernel, stride=1)
        y = (self.trend(trend) + self.seasonal(xt - trend)).transpose(1, 2)
        return y + self._base(x, x.mean(1, keepdim=True)) if self.season else y


class SeasonalResidual(nn.Module):
    """Make a forecaster learn the correction to the seasonal-naive forecast (the last ``season`` context
    steps repeated; with ``profile``, each phase averaged over the whole seasons of the context) instead of
    to the window mean: an all-zero correction is exactly that forecast."""

    def __init__(self, inner: _Forecaster, season: int, profile: bool = False) -> None:
        super().__init__()
        if not 1 <= season <= inner.context:
            raise ValueError(f"SeasonalResidual: season must be in [1, context={inner.context}], got {season}")
        inner.season, inner.profile = season, profile
        self.inner, self.season, self.profile = inner, season, profile
        self.context, self.horizon, self.variates = inner.context, inner.horizon, inner.variates

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


FORECASTERS = {
    "spacetime": SpaceTime,
    "smamba": SMamba,
    "mamba": lambda c, h, v: SeqForecaster(c, h, v, kind="mamba"),
    "s4d": lambda c, h, v: SeqForecaster(c, h, v, kind="s4d"),
    "dlinear": DLinear,
}
#: the forecasters built from ssmkit's SSM layers (DLinear is a baseline)
SSM_FORECASTERS = ("spacetime", "smamba", "mamba", "s4d")

"""Forecasters built from ssmkit's layers, plus DLinear (sktime's, a linear baseline); the classifier is in
:mod:`.classify`.

Every forecaster maps a context (batch, context, variates) to a forecast (batch, horizon, variates). The SSM
forecasters normalise each window by its own mean and std over time and undo it on the output (RevIN without
the affine part), as SpaceTime and S-Mamba do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.base import require_module
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


def seasonal_drift(x: Tensor, season: int, horizon: int) -> Tensor:
    """Seasonal naive with drift (a seasonal random walk with drift): step t (0-based) of the horizon is the
    seasonal-naive value plus (t // season + 1) times the mean seasonal difference x_s - x_{s-season} over
    the context; x (batch, context, variates) with context > season -> (batch, horizon, variates)."""
    if x.shape[1] <= season:
        raise ValueError(f"seasonal_drift: the context ({x.shape[1]}) must be longer than season={season}")
    drift = (x[:, season:] - x[:, :-season]).mean(1, keepdim=True)
    k = (torch.arange(horizon, device=x.device) // season + 1).to(x.dtype)[None, :, None]
    return seasonal_naive(x, season, horizon) + k * drift


#: the base forecasts a forecaster's correction is added to (``TrainConfig.base``)
BASES = ("seasonal", "profile", "drift", "mean")


def base_forecast(x: Tensor, kind: str, season: int, horizon: int) -> Tensor:
    """The base forecast ``kind`` of :data:`BASES` of x (batch, context, variates): (batch, horizon, variates)."""
    if kind == "mean":
        return x.mean(1, keepdim=True).expand(-1, horizon, -1)
    fns = {"seasonal": seasonal_naive, "profile": seasonal_profile, "drift": seasonal_drift}
    if kind not in fns:
        raise ValueError(f"base_forecast: kind={kind!r} is invalid: expected one of {', '.join(BASES)}")
    return fns[kind](x, season, horizon)


class _WindowNorm(nn.Module):
    """Standardise each window over time; ``undo`` maps outputs back."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False).clamp(min=1e-5)
        return (x - mean) / std, mean, std


class _Forecaster(nn.Module):
    """Shared output rule: a correction scaled by the window std, added to the window mean, or, once
    ``season`` is set (by :class:`SeasonalResidual`), to the base forecast ``base_kind`` of the window
    (:func:`base_forecast`)."""

    season: int = 0
    base_kind: str = "mean"

    def _base(self, x: Tensor, mean: Tensor) -> Tensor:
        if not self.season:
            return mean
        return base_forecast(x, self.base_kind, self.season, self.horizon)

    def output_layers(self) -> list[nn.Linear]:
        """The last Linear layers before the output rule (all zeroed, the forecaster returns exactly its base)."""
        if isinstance(getattr(self, "out", None), nn.Sequential):
            return [self.out[-1]]
        return [self.head]


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


class DLinear(nn.Module):
    """DLinear (Zeng et al., AAAI 2023) as sktime ships it (``LTSFDLinearNetwork``, the cure-lab code): a
    moving average of kernel 25 (replicate-padded) splits the context into trend and remainder, one Linear
    each (shared across variates) maps them to the horizon, and the two are summed. No base, no window
    normalisation: the standard definition, a baseline. x (batch, context, variates) -> (batch, horizon,
    variates)."""

    def __init__(self, context: int, horizon: int, variates: int) -> None:
        super().__init__()
        ltsf = require_module("sktime.networks.ltsf.models.linear", task="dlinear baseline", pip="sktime")
        self.context, self.horizon, self.variates = context, horizon, variates
        self.net = ltsf.LTSFDLinearNetwork(context, horizon, variates, individual=False)._build()

    def forward(self, x: Tensor) -> Tensor:
        _check("DLinear", x, self.context, self.variates)
        return self.net(x)


class SeasonalResidual(nn.Module):
    """Make a forecaster learn the correction to the base forecast ``kind`` of :data:`BASES` other than the
    window mean (seasonal naive, its profile over the context's seasons, or seasonal naive with drift)
    instead of to the window mean: an all-zero correction is exactly that forecast."""

    def __init__(self, inner: _Forecaster, season: int, kind: str = "seasonal") -> None:
        super().__init__()
        if not 1 <= season <= inner.context:
            raise ValueError(f"SeasonalResidual: season must be in [1, context={inner.context}], got {season}")
        if kind not in BASES or kind == "mean":
            raise ValueError(f"SeasonalResidual: kind={kind!r} is invalid: expected seasonal, profile or drift")
        if kind == "drift" and season >= inner.context:
            raise ValueError(f"SeasonalResidual: drift needs season < context={inner.context}, got {season}")
        inner.season, inner.base_kind = season, kind
        self.inner, self.season, self.kind = inner, season, kind
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

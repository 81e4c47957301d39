"""Rolling-origin evaluation of forecasters, and train/test evaluation of classifiers.

Forecasting protocol on a series of n points with horizons H_1 < ... < H_max:

- origins o_1 < ... < o_K, spaced by max(1, H_max // 2), the last at n - H_max; each forecaster predicts
  y[o : o + H_max] from y[:o] and every horizon H is scored on the first H steps;
- neural models (each learning the correction to seasonal naive, :class:`SeasonalResidual`, unless
  ``TrainConfig.seasonal_residual`` is off) train once per seed on windows that end before o_1 (the last 15%
  of those windows choose the checkpoint), on the series z-normalised by the mean and std of y[:o_1];
  statistical baselines refit at every origin on (at most the last ``max_history`` points of) y[:o];
- MASE (scale: the in-sample seasonal-naive error of y[:o]) and sMAPE on the original scale of the target,
  MSE and MAE on its z-normalised scale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import metrics
from .baselines import stat_forecast
from .models import FORECASTERS, SeasonalResidual, SSMClassifier


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    evals: int = 10  # validation passes (checkpoint selection) over the run
    max_val: int = 256  # validation windows (evenly spaced over the last 15% of the training windows)
    seasonal_residual: bool = True  # neural forecasters learn the correction to seasonal naive


def origins(n: int, horizons: tuple[int, ...], count: int = 5) -> list[int]:
    """``count`` forecast origins spaced by max(1, H_max // 2), the last at n - H_max."""
    h = max(horizons)
    if h >= n:
        raise ValueError(f"horizon={h} is longer than the series ({n} points)")
    step = max(1, h // 2)
    out = [n - h - step * i for i in range(count - 1, -1, -1)]
    if out[0] < 2:
        raise ValueError(f"horizon={h} with {count} origins needs more than {n} points")
    return out


def _windows(z: np.ndarray, end: int, context: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """All (context, horizon) windows whose horizon ends by ``end``: x (w, context, v), y (w, horizon, v)."""
    starts = np.arange(context, end - horizon + 1)
    x = z[starts[:, None] + np.arange(-context, 0)]
    y = z[starts[:, None] + np.arange(horizon)]
    return x, y


def train_forecaster(name: str, z: np.ndarray, end: int, context: int, horizon: int, seed: int,
                     cfg: TrainConfig, season: int = 1) -> nn.Module:
    """Train forecaster ``name`` on windows of the normalised series z (time, variates) ending by ``end``
    (wrapped in :class:`SeasonalResidual` with ``season`` when ``cfg.seasonal_residual``)."""
    x, y = _windows(z, end, context, horizon)
    if len(x) < 2:
        raise ValueError(f"context={context} + horizon={horizon} leave {len(x)} training window(s) in the "
                         f"{end} points before the first origin; shorten the context")
    n_val = max(1, int(round(0.15 * len(x))))
    xt, yt = torch.tensor(x[:-n_val], dtype=torch.float32), torch.tensor(y[:-n_val], dtype=torch.float32)
    pick = np.linspace(len(x) - n_val, len(x) - 1, min(n_val, cfg.max_val)).round().astype(int)
    xv, yv = torch.tensor(x[pick], dtype=torch.float32), torch.tensor(y[pick], dtype=torch.float32)
    torch.manual_seed(seed)
    model = FORECASTERS[name](context, horizon, z.shape[1])
    if cfg.seasonal_residual:
        model = SeasonalResidual(model, season)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = float("inf"), None
    every = max(1, cfg.steps // cfg.evals)
    for step in range(1, cfg.steps + 1):
        model.train()
        idx = torch.randint(len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
        loss = nn.functional.mse_loss(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == cfg.steps:
            model.eval()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(model(xv), yv))
            if val < best:
                best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def _score(rows: list[dict], base: dict, forecast: np.ndarray, series: np.ndarray, o: int,
           horizons: tuple[int, ...], season: int, mean: float, std: float) -> None:
    for h in horizons:
        f, a = forecast[:h], series[o:o + h]
        rows.append({**base, "origin": o, "horizon": h,
                     "mase": metrics.mase(f, a, series[:o], season), "smape": metrics.smape(f, a),
                     "mse": metrics.mse((f - mean) / std, (a - mean) / std),
                     "mae": metrics.mae((f - mean) / std, (a - mean) / std)})


def evaluate_forecasting(name: str, values: np.ndarray, season: int, horizons: tuple[int, ...], context: int,
                         models: list[str], seeds: list[int], cfg: TrainConfig, n_origins: int = 5,
                         max_history: int = 1000, keep_forecasts: bool = False) -> tuple[list[dict], dict]:
    """Score ``models`` (neural names of FORECASTERS or statistical baselines) on one series.

    values (time, variates) with the target in column 0. Returns (rows of metrics, forecasts) where forecasts
    maps model -> {origin: PointForecast-like dict} when ``keep_forecasts`` (first seed only).
    """
    series = values[:, 0]
    os_ = origins(len(values), horizons, n_origins)
    hmax = max(horizons)
    train_end = os_[0]
    mu, sd = values[:train_end].mean(0), values[:train_end].std(0)
    if np.any(sd == 0):
        raise ValueError(f"{name}: a column is constant before the first origin (line {train_end + 1}); "
                         "nothing to learn from")
    z = ((values - mu) / sd).astype(np.float32)
    rows: list[dict] = []
    kept: dict = {}
    for model in models:
        if model in FORECASTERS:
            for seed in seeds:
                net = train_forecaster(model, z, train_end, context, hmax, seed, cfg, season)
                with torch.no_grad():
                    ctx = torch.tensor(np.stack([z[o - context:o] for o in os_]))
                    out = net(ctx)[:, :, 0].double().numpy() * sd[0] + mu[0]
                for o, f in zip(os_, out, strict=True):
                    _score(rows, {"dataset": name, "model": model, "seed": seed}, f, series, o, horizons,
                           season, mu[0], sd[0])
                    if keep_forecasts and seed == seeds[0]:
                        kept.setdefault(model, {})[o] = {"mean": f}
        else:
            for o in os_:
                pf = stat_forecast(model, series[max(0, o - max_history):o], season, hmax)
                _score(rows, {"dataset": name, "model": model, "seed": -1}, pf.mean, series, o, horizons,
                       season, mu[0], sd[0])
                if keep_forecasts:
                    kept.setdefault(model, {})[o] = {"mean": pf.mean, "lower": pf.lower, "upper": pf.upper}
    return rows, kept


def train_classifier(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int,
                     cfg: TrainConfig) -> float:
    """Test accuracy of :class:`SSMClassifier` trained for ``cfg.steps`` steps on the whole training split.

    X (cases, channels, length), z-normalised per channel by the training split; labels str.
    """
    classes = sorted(set(train[1].tolist()))
    index = {c: i for i, c in enumerate(classes)}
    mean = train[0].mean(axis=(0, 2), keepdims=True)
    std = np.where((s := train[0].std(axis=(0, 2), keepdims=True)) > 0, s, 1.0)

    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(((x - mean) / std).transpose(0, 2, 1), dtype=torch.float32)

    xt, xs = prep(train[0]), prep(test[0])
    yt = torch.tensor([index[c] for c in train[1]])
    torch.manual_seed(seed)
    model = SSMClassifier(xt.shape[2], len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        model.train()
        idx = torch.randint(len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xs[i:i + 64]).argmax(-1) for i in range(0, len(xs), 64)])
    return float(np.mean(np.array(classes)[pred.numpy()] == test[1]))

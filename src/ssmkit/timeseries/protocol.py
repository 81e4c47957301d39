"""Rolling-origin evaluation of forecasters, and train/test evaluation of classifiers.

Forecasting protocol on a series of n points with horizons H_1 < ... < H_max:

- origins o_1 < ... < o_K, spaced by max(1, H_max // 2), the last at n - H_max; each forecaster predicts
  y[o : o + H_max] from y[:o] and every horizon H is scored on the first H steps;
- SSM forecasters learn the correction to a base forecast (``TrainConfig.base``: seasonal naive, its profile
  over the context's seasons (:class:`SeasonalResidual`), seasonal naive with drift, the window mean, or
  whichever of those has the lowest MSE on the validation windows); DLinear, a baseline, takes no base and
  trains ``baseline_steps`` at ``baseline_lr``. Every neural model trains once per seed on windows that end
  before o_1 (the last ``val_frac`` of those windows validate and choose the checkpoint; with ``purge``, the
  training windows stop horizon - 1 windows earlier, so no validation target is a training target; with
  ``keep_base``, the untrained step-0 model is a candidate), on the series z-normalised by the mean and std
  of y[:o_1]; statistical baselines refit at every origin on (at most the last ``max_history`` points of)
  y[:o];
- every neural model carries a :class:`.intervals.GaussianHead`, calibrated on the same validation windows;
- ``ssm``: among the SSM forecasters evaluated, the seed ensemble (mean forecast, Gaussian mixture interval)
  of the variant, or of all variants together, with the lowest MSE on the validation windows (never on the
  forecast origins; with ``one_se``, 'all' unless a variant is better by one standard error);
- MASE (scale: the in-sample seasonal-naive error of y[:o]) and sMAPE on the original scale of the target,
  MSE and MAE on its z-normalised scale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import metrics
from .baselines import stat_forecast
from .intervals import Z80, GaussianHead, coverage, mixture
from .models import BASES, FORECASTERS, SSM_FORECASTERS, SeasonalResidual, base_forecast


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    evals: int = 10  # validation passes (checkpoint selection) over the run
    max_val: int = 256  # validation windows (evenly spaced over the last 15% of the training windows)
    #: what an SSM's correction is added to: 'seasonal' naive, the seasonal 'profile', seasonal naive with
    #: 'drift', the window 'mean', or 'auto' (of those, the one with the lowest MSE on the validation windows;
    #: no training involved). DLinear, a baseline, takes no base.
    base: str = "seasonal"
    zero_init: bool = False  # zero the output layer: training starts from the base forecast exactly
    keep_base: bool = False  # the untrained step-0 model is a checkpoint candidate too (with zero_init: the base)
    loss: str = "mse"  # point loss: 'mse' or 'mae'
    weight_decay: float = 1e-4
    #: drop the horizon - 1 training windows before the validation windows, so that no validation target is a
    #: training target (without it, the last training windows' targets cover the validation targets)
    purge: bool = True
    val_frac: float = 0.15  # the share of the windows before the first origin that validate
    #: DLinear's own budget: Adam at 5e-3 as in the LTSF-Linear scripts, and 300 steps (the SSMs' 100 left it
    #: far from converged from its standard initialisation: measured, docs/time_series.md)
    baseline_steps: int = 300
    baseline_lr: float = 5e-3

    def __post_init__(self) -> None:
        if self.base not in (*BASES, "auto"):
            raise ValueError(f"TrainConfig: base={self.base!r} is invalid: expected one of {', '.join(BASES)}, auto")
        if self.loss not in ("mse", "mae"):
            raise ValueError(f"TrainConfig: loss={self.loss!r} is invalid: expected 'mse' or 'mae'")
        if not 0 < self.val_frac < 1:
            raise ValueError(f"TrainConfig: val_frac={self.val_frac} is invalid: expected 0 < val_frac < 1")
        if min(self.steps, self.baseline_steps, self.batch_size, self.evals, self.max_val) < 1:
            raise ValueError(f"TrainConfig: steps, baseline_steps, batch_size, evals and max_val must be >= 1, "
                             f"got {self}")


def choose_base(x: np.ndarray, y: np.ndarray, season: int) -> str:
    """The base of :data:`BASES` with the lowest MSE on windows x (w, context, v), y (w, horizon, v), ties to
    the first (the choice ``TrainConfig.base='auto'`` makes on the validation windows). The seasonal bases
    need season <= context (drift: season < context)."""
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    kinds = [b for b in BASES if b == "mean" or season < x.shape[1] or (season == x.shape[1] and b != "drift")]
    mse = {b: float(((base_forecast(xt, b, season, y.shape[1]) - yt) ** 2).mean()) for b in kinds}
    return min(kinds, key=mse.__getitem__)


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


@dataclass
class Fitted:
    """A trained forecaster and its predictions on the validation windows, (windows, horizon, variates)."""

    model: GaussianHead
    val_pred: np.ndarray
    val_true: np.ndarray
    base: str = "seasonal"
    step: int = -1  # the training step of the checkpoint (0: the untrained model, see TrainConfig.keep_base)
    val_mse: float = field(init=False)

    def __post_init__(self) -> None:
        self.val_mse = float(((self.val_pred - self.val_true) ** 2).mean())


def train_forecaster(name: str, z: np.ndarray, end: int, context: int, horizon: int, seed: int,
                     cfg: TrainConfig, season: int = 1) -> Fitted:
    """Train forecaster ``name`` (with a :class:`GaussianHead`) on windows of the normalised series z
    (time, variates) ending by ``end`` (an SSM wrapped in :class:`SeasonalResidual` with ``season`` unless its
    base is the window mean); the validation windows choose the checkpoint and calibrate sigma."""
    x, y = _windows(z, end, context, horizon)
    if len(x) < 2:
        raise ValueError(f"context={context} + horizon={horizon} leave {len(x)} training window(s) in the "
                         f"{end} points before the first origin; shorten the context")
    n_val = max(1, int(round(cfg.val_frac * len(x))))
    n_train = len(x) - n_val - (horizon - 1 if cfg.purge else 0)
    if n_train < 2:
        raise ValueError(f"context={context} + horizon={horizon} leave {max(n_train, 0)} training window(s) "
                         f"before the validation windows in the {end} points before the first origin")
    xt, yt = torch.tensor(x[:n_train], dtype=torch.float32), torch.tensor(y[:n_train], dtype=torch.float32)
    pick = np.linspace(len(x) - n_val, len(x) - 1, min(n_val, cfg.max_val)).round().astype(int)
    xv, yv = torch.tensor(x[pick], dtype=torch.float32), torch.tensor(y[pick], dtype=torch.float32)
    torch.manual_seed(seed)
    inner = FORECASTERS[name](context, horizon, z.shape[1])
    steps, lr = cfg.steps, cfg.lr
    if name not in SSM_FORECASTERS:  # DLinear, a baseline: its standard definition, initialisation and budget
        base, steps, lr = "none", cfg.baseline_steps, cfg.baseline_lr
        model = GaussianHead(inner)
    else:
        if cfg.zero_init:
            with torch.no_grad():
                for layer in inner.output_layers():
                    layer.weight.zero_()
                    layer.bias.zero_()
        base = choose_base(x[pick], y[pick], season) if cfg.base == "auto" else cfg.base
        model = GaussianHead(inner if base == "mean" else SeasonalResidual(inner, season, base))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_step = float("inf"), None, -1
    every = max(1, steps // cfg.evals)
    for step in range(0 if cfg.keep_base else 1, steps + 1):
        if step:
            model.train()
            idx = torch.randint(len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
            loss = model.loss(xt[idx], yt[idx], cfg.loss)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if step % every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(model(xv), yv))
            if val < best or best_state is None:
                best, best_state, best_step = val, copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    model.eval()
    model.calibrate(xv, yv)
    with torch.no_grad():
        pred = model(xv).double().numpy()
    return Fitted(model, pred, yv.double().numpy(), base, best_step)


def _score(rows: list[dict], base: dict, forecast: np.ndarray, series: np.ndarray, o: int,
           horizons: tuple[int, ...], season: int, mean: float, std: float,
           lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> None:
    for h in horizons:
        f, a = forecast[:h], series[o:o + h]
        rows.append({**base, "origin": o, "horizon": h,
                     "mase": metrics.mase(f, a, series[:o], season), "smape": metrics.smape(f, a),
                     "mse": metrics.mse((f - mean) / std, (a - mean) / std),
                     "mae": metrics.mae((f - mean) / std, (a - mean) / std),
                     "cov80": None if lower is None else coverage(lower[:h], upper[:h], a)})


def _choose(fits: dict[str, list[Fitted]], one_se: bool = False) -> tuple[str, list[str]]:
    """(choice, members): the variant, or 'all' variants, whose seed-ensemble validation MSE is lowest.

    ``one_se``: 'all' is the default, and a single variant replaces it only when its validation MSE is lower
    by more than one standard error of the paired per-window difference (a few validation windows on a short
    series cannot tell the variants apart; the average of all of them varies least)."""
    def window_se(members: list[str]) -> np.ndarray:
        pred = np.mean([f.val_pred for m in members for f in fits[m]], 0)
        err = (pred - fits[members[0]][0].val_true) ** 2
        return err.reshape(len(err), -1).mean(1)

    options = {m: [m] for m in fits}
    if len(fits) > 1:
        options["all"] = list(fits)
    errs = {k: window_se(v) for k, v in options.items()}
    choice = min(options, key=lambda k: float(errs[k].mean()))
    if one_se and "all" in options and choice != "all":
        d = errs[choice] - errs["all"]
        if len(d) < 2 or d.mean() + d.std(ddof=1) / np.sqrt(len(d)) >= 0:
            choice = "all"
    return choice, options[choice]


def evaluate_forecasting(name: str, values: np.ndarray, season: int, horizons: tuple[int, ...], context: int,
                         models: list[str], seeds: list[int], cfg: TrainConfig, n_origins: int = 5,
                         max_history: int = 1000, keep_forecasts: bool = False,
                         select: bool = False, one_se: bool = False) -> tuple[list[dict], dict]:
    """Score ``models`` (neural names of FORECASTERS or statistical baselines) on one series.

    values (time, variates) with the target in column 0. Neural models get one row per seed, origin and
    horizon (carrying the ``base`` and checkpoint ``step`` of that seed's model); with ``select``, the
    validation-chosen SSM ensemble (:func:`_choose` with ``one_se``) is added as model ``ssm`` (its rows carry
    ``choice``). Returns (rows, forecasts) where forecasts maps model -> {origin: {"mean", "lower", "upper"}}
    (80% intervals; neural models: the mixture over seeds) when ``keep_forecasts``.
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
    ctx = torch.tensor(np.stack([z[o - context:o] for o in os_]))
    rows: list[dict] = []
    kept: dict = {}
    fits: dict[str, list[Fitted]] = {}
    preds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # model -> per seed (mean, sigma) (origins, hmax)
    for model in models:
        if model in FORECASTERS:
            for seed in seeds:
                fit = train_forecaster(model, z, train_end, context, hmax, seed, cfg, season)
                with torch.no_grad():
                    m, s = fit.model.dist(ctx)
                m, s = m[:, :, 0].double().numpy() * sd[0] + mu[0], s[:, :, 0].double().numpy() * sd[0]
                fits.setdefault(model, []).append(fit)
                preds.setdefault(model, []).append((m, s))
                for o, f, sig in zip(os_, m, s, strict=True):
                    _score(rows, {"dataset": name, "model": model, "seed": seed, "base": fit.base,
                                  "step": fit.step}, f, series, o, horizons,
                           season, mu[0], sd[0], f - Z80 * sig, f + Z80 * sig)
            if keep_forecasts:
                mean, sig = mixture(*map(np.stack, zip(*preds[model], strict=True)))
                kept[model] = {o: {"mean": mean[i], "lower": mean[i] - Z80 * sig[i], "upper": mean[i] + Z80 * sig[i]}
                               for i, o in enumerate(os_)}
        else:
            for o in os_:
                pf = stat_forecast(model, series[max(0, o - max_history):o], season, hmax)
                _score(rows, {"dataset": name, "model": model, "seed": -1}, pf.mean, series, o, horizons,
                       season, mu[0], sd[0], pf.lower, pf.upper)
                if keep_forecasts:
                    kept.setdefault(model, {})[o] = {"mean": pf.mean, "lower": pf.lower, "upper": pf.upper}
    ssm = {m: f for m, f in fits.items() if m in SSM_FORECASTERS}
    if select and ssm:
        choice, members = _choose(ssm, one_se)
        mean, sig = mixture(*map(np.stack, zip(*[p for m in members for p in preds[m]], strict=True)))
        for i, o in enumerate(os_):
            _score(rows, {"dataset": name, "model": "ssm", "seed": -1, "choice": choice}, mean[i], series, o,
                   horizons, season, mu[0], sd[0], mean[i] - Z80 * sig[i], mean[i] + Z80 * sig[i])
    return rows, kept

"""AdamW with weight-decay exclusions, the learning-rate schedule and gradient clipping.

Weight decay applies to weight matrices only. Excluded (see :func:`no_decay_reason`):

* every parameter with fewer than 2 dims (biases, norm weights, D, dt biases, per-channel log-dt, RG-LRU's
  ``lam``, Mamba-2's per-head A_log);
* norm weights (any parameter of a norm module, whatever its shape);
* SSM dynamics, by name: ``A_log``, ``A_log_re``, ``A_im``, ``Lambda_log_re``, ``Lambda_im``, ``log_dt``,
  ``dt_bias``, ``D``, ``lam``, ``dt_proj.bias``, and the S4/S4D/H3 state matrices ``P`` and ``B`` (decaying
  them pulls the dynamics away from their HiPPO initialisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig

#: final name components never decayed (SSM dynamics)
NO_DECAY_NAMES = ("A_log", "A_log_re", "A_im", "Lambda_log_re", "Lambda_im", "log_dt", "dt_bias", "D", "lam")
#: S4-family state matrices (by the owning module's class name)
_S4_FAMILY = ("S4D", "S4", "H3", "_DiagonalSSM", "DiagonalSSM")
_S4_NO_DECAY = ("P", "B")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def no_decay_reason(name: str, param: nn.Parameter, owner: nn.Module) -> str | None:
    """Why parameter ``name`` (owned by ``owner``) gets no weight decay, or None when it is decayed."""
    leaf = name.rsplit(".", 1)[-1]
    if _is_norm(owner):
        return "norm"
    if leaf in NO_DECAY_NAMES:
        return "ssm"
    if name.endswith("dt_proj.bias"):
        return "ssm"
    if leaf in _S4_NO_DECAY and any(k in type(owner).__name__ for k in _S4_FAMILY):
        return "ssm"
    if param.ndim < 2:
        return "bias/1-d"
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: {"decay": matrices} and {"no_decay": the exclusions above}. Tied parameters once.

    Each group carries ``name`` and ``param_names`` (for checks and checkpoints).
    """
    modules = dict(model.named_modules())
    seen: set[int] = set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        (no_decay if no_decay_reason(name, p, owner) else decay).append((name, p))
    groups = []
    for gname, items, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "weight_decay": wd, "name": gname,
                           "param_names": [n for n, _ in items]})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; every group's ``base_lr`` is ``cfg.lr`` (the schedule scales it)."""
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["base_lr"] = cfg.lr
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over ``warmup_steps`` then cosine / linear decay to ``min_ratio`` or constant.

    ``factor(step)`` is the multiplier of the peak lr used for optimizer step ``step`` (0-based):
    warm-up: (step + 1) / warmup_steps; then with p = (step - warmup) / max(1, total - warmup) in [0, 1]:
    cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi p)) / 2; linear: 1 - (1 - min_ratio) p; constant: 1.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.1

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "linear":
            return 1.0 - (1.0 - self.min_ratio) * p
        raise ValueError(f"LRSchedule: unknown kind {self.kind!r}; expected 'cosine', 'linear' or 'constant'")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LRSchedule:
        return cls(cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to ``base_lr * factor(step)``; returns the factor."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * f
        return f


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0 = no clipping); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))

"""Objective mixtures: fixed baselines and the Birdie controller, all over the same arms.

``make_mixture(name, arms)`` with name one of :data:`MIXTURES`:

* ``ntp``: pure next-token prediction (all mass on the next-token arms).
* ``ul2``: 60% next-token, 20% prefix-LM, 10% infilling (15%, mean span 3), 10% infilling (50%, mean span 32);
  each share is split evenly over the matching arms (e.g. the infilling length variants).
* ``fixed``: a uniform fixed mix of all arms.
* ``birdie``: the reward-driven controller (:class:`ssmkit.objectives.controller.BirdieController`).
* ``birdie-causal``: the same controller. Only the model differs: causal-only layers, so the trainer must not
  pass ``prefix_mask`` to it (``mixture.prefix_bidirectional`` is False).

``prefix_bidirectional`` is the model side each mixture is meant for (True: a model with prefix-bidirectional
layers that takes the batches' ``prefix_mask``; False: a causal model that ignores it). It is advice for the
experiment script; the mixture itself does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arms import arm_classes, check_unique_arms
from .controller import BirdieController, ControllerConfig
from .objectives import Objective

MIXTURES = ("ntp", "ul2", "fixed", "birdie", "birdie-causal")


class Mixture:
    """A distribution over ``arms``. Subclasses provide ``probs``; adaptive ones override the eval hooks."""

    name: str = "mixture"
    prefix_bidirectional: bool = True

    def __init__(self, arms: Sequence[Objective]) -> None:
        check_unique_arms(arms)
        self.arms = list(arms)
        self.arm_names = [a.name for a in self.arms]

    @property
    def probs(self) -> np.ndarray:
        raise NotImplementedError

    def needs_eval(self, step: int) -> bool:
        """Whether per-arm validation losses should be fed to :meth:`on_eval` after ``step`` steps."""
        return False

    def on_eval(self, step: int, losses: Mapping[str, float] | Sequence[float]) -> None:
        """Per-arm validation losses after ``step`` steps (ignored by fixed mixtures)."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arm_names": list(self.arm_names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name or list(state.get("arm_names", [])) != self.arm_names:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is for mixture "
                             f"{state.get('name')!r} over other arms; this is {self.name!r}")


class FixedMixture(Mixture):
    """A fixed distribution ``probs`` (num_arms,), non-negative, normalised to sum to 1."""

    def __init__(self, arms: Sequence[Objective], probs: Sequence[float], name: str = "fixed",
                 prefix_bidirectional: bool = True) -> None:
        super().__init__(arms)
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(self.arms),) or not np.all(np.isfinite(p)) or (p < 0).any() or not p.sum() > 0:
            raise ValueError(f"FixedMixture: probs must be {len(self.arms)} finite non-negative numbers with a "
                             f"positive sum, got {probs!r}")
        self._probs = p / p.sum()
        self.name, self.prefix_bidirectional = name, prefix_bidirectional

    @property
    def probs(self) -> np.ndarray:
        return self._probs.copy()


class BirdieMixture(Mixture):
    """The Birdie controller as a mixture: ``probs`` is the controller's current action."""

    def __init__(self, arms: Sequence[Objective], config: ControllerConfig | None = None, name: str = "birdie",
                 prefix_bidirectional: bool = True) -> None:
        super().__init__(arms)
        self.controller = BirdieController(self.arm_names, arm_classes(self.arms), config)
        self.name, self.prefix_bidirectional = name, prefix_bidirectional

    @property
    def probs(self) -> np.ndarray:
        return self.controller.action.copy()

    def needs_eval(self, step: int) -> bool:
        return self.controller.config.is_eval_step(step)

    def on_eval(self, step: int, losses: Mapping[str, float] | Sequence[float]) -> None:
        self.controller.on_eval(step, losses)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "controller": self.controller.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])


def _shares(arms: Sequence[Objective], wanted: Sequence[tuple[float, str, dict[str, Any]]]) -> np.ndarray:
    """Mass ``share`` split over the arms of ``family`` whose params match ``params``, for each entry."""
    p = np.zeros(len(arms))
    for share, family, params in wanted:
        idx = [i for i, a in enumerate(arms)
               if a.family == family and all(a.params().get(k) == v for k, v in params.items())]
        if not idx:
            raise ValueError(f"mixture needs an arm of family {family!r} with {params or 'any parameters'}; "
                             f"none among the given arms")
        p[idx] += share / len(idx)
    return p


def make_mixture(name: str, arms: Sequence[Objective], *, config: ControllerConfig | None = None) -> Mixture:
    """A mixture from :data:`MIXTURES` over ``arms`` (``config`` for the birdie controllers)."""
    if name not in MIXTURES:
        raise ValueError(f"make_mixture: unknown mixture {name!r}; expected one of {', '.join(MIXTURES)}")
    if name == "ntp":
        return FixedMixture(arms, _shares(arms, [(1.0, "next_token", {})]), "ntp", prefix_bidirectional=False)
    if name == "ul2":
        p = _shares(arms, [(0.6, "next_token", {}), (0.2, "prefix_lm", {}),
                           (0.1, "infilling", {"mask_rate": 0.15, "mean_span": 3}),
                           (0.1, "infilling", {"mask_rate": 0.5, "mean_span": 32})])
        return FixedMixture(arms, p, "ul2")
    if name == "fixed":
        return FixedMixture(arms, np.ones(len(arms)), "fixed")
    return BirdieMixture(arms, config, name, prefix_bidirectional=name == "birdie")

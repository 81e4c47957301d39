"""Birdie's controller: a multi-armed bandit whose action is a probability vector over the objective arms.

Schedule (every number is a :class:`ControllerConfig` field; :meth:`ControllerConfig.scaled` shrinks them all
for short CPU runs):

* the mixture is uniform for the first ``warmup_steps`` (250) training steps;
* per-arm validation losses are measured at steps ``eval_steps`` (10, 50, 250, 500, 1000, 1500, 2000) and then
  every ``eval_every`` (1000) steps;
* at each evaluation the reward of the action taken since the last one is computed per arm
  (:func:`ssmkit.objectives.reward.birdie_reward`), appended to the history, and the reward model is fitted for
  ``fit_steps`` (200) AdamW steps of MSE on all observed rewards;
* after warmup a new action is chosen: with the exploration probability (cosine decay from ``explore_max`` 0.5
  to ``explore_min`` 0.2 over ``explore_decay_steps``) an exploring action, which puts random mass on 1-2
  objective classes and ``explore_rest_mass`` on the rest; otherwise ``num_candidates`` candidate actions
  (half normalised uniform vectors, half normalised Pareto draws with (scale, alpha) = (2, 1), (3, 2), (5, 3))
  are scored by the reward model as the history followed by [current loss || candidate], each arm's predicted
  reward weighted by 1 / (arms in its class), and the ``top_k`` (8) best candidates are averaged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssmkit._dataclass_dict import dataclass_from_dict, dataclass_to_dict

from .arms import class_weights
from .reward import LAYERS, RewardModel, birdie_reward

_PARETO = ((2.0, 1.0), (3.0, 2.0), (5.0, 3.0))


def _finite(x: np.ndarray) -> np.ndarray:
    """Non-finite losses (NaN, inf) as 0 for the reward model's input."""
    return np.where(np.isfinite(x), x, 0.0)


@dataclass(frozen=True)
class ControllerConfig:
    """Controller hyper-parameters (paper values by default)."""

    warmup_steps: int = 250
    eval_steps: tuple[int, ...] = (10, 50, 250, 500, 1000, 1500, 2000)
    eval_every: int = 1000
    fit_steps: int = 200
    lr: float = 5e-4
    weight_decay: float = 0.1
    hidden: int = 256
    num_layers: int = 4
    layer: str = "attention"
    num_candidates: int = 2048
    top_k: int = 8
    explore_max: float = 0.5
    explore_min: float = 0.2
    explore_decay_steps: int = 8192
    explore_rest_mass: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"warmup_steps": 0, "eval_every": 1, "fit_steps": 0, "hidden": 1, "num_layers": 1,
                "num_candidates": 1, "top_k": 1, "explore_decay_steps": 1, "seed": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"ControllerConfig: {name} must be an int >= {lo}, got {v!r}")
        steps = self.eval_steps
        if (not isinstance(steps, tuple) or not steps
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps)
                or list(steps) != sorted(set(steps))):
            raise ValueError(f"ControllerConfig: eval_steps must be a non-empty increasing tuple of positive ints, "
                             f"got {steps!r}")
        for name in ("lr", "weight_decay", "explore_max", "explore_min", "explore_rest_mass"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ControllerConfig: {name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"ControllerConfig: lr must be > 0, got {self.lr!r}")
        if not 0 <= self.explore_min <= self.explore_max <= 1:
            raise ValueError(f"ControllerConfig: need 0 <= explore_min <= explore_max <= 1, got "
                             f"{self.explore_min!r} and {self.explore_max!r}")
        if not self.explore_rest_mass < 1:
            raise ValueError(f"ControllerConfig: explore_rest_mass must be < 1, got {self.explore_rest_mass!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"ControllerConfig: unknown layer {self.layer!r}; expected one of {LAYERS}")

    def scaled(self, factor: float) -> ControllerConfig:
        """The same schedule with every step count (warmup, evaluations, exploration decay) times ``factor``."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"ControllerConfig.scaled: factor must be a positive number, got {factor!r}")

        def s(v: int) -> int:
            return max(1, round(v * factor))

        return dataclasses.replace(
            self, warmup_steps=round(self.warmup_steps * factor), eval_every=s(self.eval_every),
            eval_steps=tuple(sorted({s(v) for v in self.eval_steps})),
            explore_decay_steps=s(self.explore_decay_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControllerConfig:
        return dataclass_from_dict(cls, d)

    # --------------------------------------------------------------------------------------- schedules
    def is_eval_step(self, step: int) -> bool:
        """Whether per-arm validation losses are due after ``step`` training steps."""
        last = self.eval_steps[-1]
        return step in self.eval_steps or (step > last and (step - last) % self.eval_every == 0)

    def explore_prob(self, step: int) -> float:
        """Cosine decay from explore_max at step 0 to explore_min at explore_decay_steps (constant after)."""
        t = min(max(step, 0) / self.explore_decay_steps, 1.0)
        return self.explore_min + (self.explore_max - self.explore_min) * 0.5 * (1.0 + math.cos(math.pi * t))


class BirdieController:
    """The reward-driven mixture controller (see the module docstring).

    Args:
        arm_names: one name per arm (for logs and to accept losses as a mapping).
        arm_classes: the objective class of each arm (reward scaling and exploration).
        config: :class:`ControllerConfig`.

    ``action`` is the current mixture (num_arms,), non-negative, summing to 1. Call :meth:`on_eval` with the
    per-arm validation losses at the steps where ``config.is_eval_step(step)``; it returns the new action.
    """

    def __init__(self, arm_names: Sequence[str], arm_classes: Sequence[str],
                 config: ControllerConfig | None = None) -> None:
        self.arm_names, self.arm_classes = list(arm_names), list(arm_classes)
        if not self.arm_names or len(self.arm_names) != len(self.arm_classes):
            raise ValueError(f"BirdieController: arm_names and arm_classes must be non-empty and of equal length, "
                             f"got {len(self.arm_names)} and {len(self.arm_classes)}")
        if len(set(self.arm_names)) != len(self.arm_names):
            raise ValueError("BirdieController: arm_names must be distinct")
        self.config = config or ControllerConfig()
        if not isinstance(self.config, ControllerConfig):
            raise TypeError(f"BirdieController: config must be a ControllerConfig, got {type(config).__name__}")
        n = self.num_arms = len(self.arm_names)
        self.weights = class_weights(self.arm_classes)
        self.classes = list(dict.fromkeys(self.arm_classes))
        self.rng = np.random.default_rng(self.config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = RewardModel(n, self.config.hidden, self.config.num_layers, self.config.layer)
        self.model.eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay, foreach=True)
        self.action = np.full(n, 1.0 / n)
        self.last_losses: np.ndarray | None = None
        self.last_step: int | None = None
        self.history_x: list[np.ndarray] = []  # [old loss || action]
        self.history_y: list[np.ndarray] = []  # observed reward per arm
        self.log: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------- update
    def _loss_vector(self, losses: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
        if isinstance(losses, Mapping):
            missing = [a for a in self.arm_names if a not in losses]
            if missing:
                raise ValueError(f"BirdieController.on_eval: losses lack arms {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}")
            vec = np.array([float(losses[a]) for a in self.arm_names])
        else:
            vec = np.asarray(losses, dtype=np.float64)
        if vec.shape != (self.num_arms,):
            raise ValueError(f"BirdieController.on_eval: losses must have one value per arm ({self.num_arms},), "
                             f"got shape {vec.shape}")
        return vec

    def on_eval(self, step: int, losses: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
        """Record per-arm validation ``losses`` measured after ``step`` training steps; return the new action.

        Before ``warmup_steps`` the action stays uniform (rewards are still recorded and the model fitted). The
        first decision with no reward history yet explores. Non-finite losses enter the model as 0.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"BirdieController.on_eval: step must be an int >= 0, got {step!r}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"BirdieController.on_eval: step {step} is not after the last evaluation "
                             f"({self.last_step})")
        losses = self._loss_vector(losses)
        entry: dict[str, Any] = {"step": step, "losses": losses.tolist()}
        if self.last_losses is not None:
            reward = birdie_reward(self.last_losses, losses)
            self.history_x.append(np.concatenate([_finite(self.last_losses), self.action]))
            self.history_y.append(reward)
            entry["reward"] = reward.tolist()
            entry["fit_loss"] = self._fit()
        explored = False
        if step < self.config.warmup_steps:
            action = np.full(self.num_arms, 1.0 / self.num_arms)
        elif not self.history_y or self.rng.random() < self.config.explore_prob(step):
            action, explored = self.explore_action(), True
        else:
            action = self.exploit_action(losses)
        self.action = action
        self.last_losses, self.last_step = losses, step
        entry.update(action=action.tolist(), explored=explored)
        self.log.append(entry)
        return action.copy()

    def _fit(self) -> float:
        x = torch.tensor(np.stack(self.history_x), dtype=torch.float32)[None]
        y = torch.tensor(np.stack(self.history_y), dtype=torch.float32)[None]
        return self.model.fit(x, y, self.optimizer, self.config.fit_steps)

    # ------------------------------------------------------------------------------------------ actions
    def explore_action(self) -> np.ndarray:
        """Random mass on 1-2 objective classes, ``explore_rest_mass`` spread evenly over the other classes."""
        cls = np.array(self.arm_classes)
        k = min(int(self.rng.integers(1, 3)), len(self.classes))
        chosen = set(self.rng.choice(len(self.classes), size=k, replace=False).tolist())
        rest = [c for i, c in enumerate(self.classes) if i not in chosen]
        rest_mass = self.config.explore_rest_mass if rest else 0.0
        action = np.zeros(self.num_arms)
        for i in sorted(chosen):
            idx = np.flatnonzero(cls == self.classes[i])
            w = self.rng.random(len(idx)) + 1e-6
            action[idx] = (1.0 - rest_mass) / k * w / w.sum()
        for c in rest:
            idx = np.flatnonzero(cls == c)
            action[idx] = rest_mass / len(rest) / len(idx)
        return action / action.sum()

    def candidates(self) -> np.ndarray:
        """(num_candidates, num_arms) normalised candidate actions: uniform draws, then Pareto draws."""
        n_total, n = self.config.num_candidates, self.num_arms
        n_uni = (n_total + 1) // 2
        parts = [self.rng.random((n_uni, n)) + 1e-9]
        n_par = n_total - n_uni
        for j, (scale, alpha) in enumerate(_PARETO):
            m = n_par // len(_PARETO) + (1 if j < n_par % len(_PARETO) else 0)
            parts.append(scale * (1.0 + self.rng.pareto(alpha, size=(m, n))))
        c = np.concatenate(parts)
        return c / c.sum(axis=1, keepdims=True)

    def predicted_rewards(self, losses: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(N, num_arms) predicted per-arm reward of each candidate after the history."""
        hist = np.stack(self.history_x) if self.history_x else np.zeros((0, 2 * self.num_arms))
        q = np.concatenate([np.broadcast_to(_finite(losses), candidates.shape), candidates], axis=1)
        pred = self.model.predict_next(torch.tensor(hist, dtype=torch.float32), torch.tensor(q, dtype=torch.float32))
        return pred.double().numpy()

    def exploit_action(self, losses: np.ndarray) -> np.ndarray:
        """Average of the ``top_k`` candidates with the highest class-weighted predicted total reward."""
        cand = self.candidates()
        score = self.predicted_rewards(losses, cand) @ self.weights
        top = np.argsort(-score, kind="stable")[: self.config.top_k]
        action = cand[top].mean(axis=0)
        return action / action.sum()

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "arm_names": list(self.arm_names),
            "arm_classes": list(self.arm_classes), "action": self.action.tolist(),
            "last_losses": None if self.last_losses is None else self.last_losses.tolist(),
            "last_step": self.last_step, "history_x": [h.tolist() for h in self.history_x],
            "history_y": [h.tolist() for h in self.history_y], "rng": self.rng.bit_generator.state,
            # deep copies: a snapshot must not alias the live tensors the next fit updates in place
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()), "log": copy.deepcopy(self.log),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["arm_names"]) != self.arm_names or list(state["arm_classes"]) != self.arm_classes:
            raise ValueError("BirdieController.load_state_dict: the state was saved for other arms")
        if ControllerConfig.from_dict(state["config"]) != self.config:
            raise ValueError("BirdieController.load_state_dict: the state was saved with another ControllerConfig")
        self.action = np.array(state["action"], dtype=np.float64)
        self.last_losses = None if state["last_losses"] is None else np.array(state["last_losses"])
        self.last_step = state["last_step"]
        self.history_x = [np.array(h) for h in state["history_x"]]
        self.history_y = [np.array(h) for h in state["history_y"]]
        self.rng.bit_generator.state = state["rng"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.log = copy.deepcopy(list(state["log"]))

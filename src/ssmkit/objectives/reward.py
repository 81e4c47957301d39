"""Birdie's reward for a change of validation loss, and the reward model (a small causal sequence model).

Reward per arm, from its old and new validation loss (e = Euler's number)::

    ratio  = (new - old) / old
    reward = clip(-100 e tanh(e sqrt(new old) ratio^3), -1, 1),   NaN -> 0

A loss decrease gives a positive reward (4.5 -> 4.2 and 0.6 -> 0.5207 both give about 0.95); an increase a
negative one.

The reward model reads the history of evaluations, one step per evaluation with input [loss vector || action]
(2 * num_arms features), and predicts at each step the reward per arm that the action earned. It is a stack of
``num_layers`` pre-norm residual blocks, each an ssmkit sequence layer (GatedSSM, or rotary causal Attention)
followed by a GELU MLP, between a Linear input projection and a Linear output head.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmkit.layers.attention import Attention
from ssmkit.layers.base import LayerState, state_kwargs
from ssmkit.layers.gated import GatedSSM

LAYERS = ("gated", "attention")


def birdie_reward(old: object, new: object) -> np.ndarray:
    """Per-arm reward for validation losses ``old`` -> ``new`` (equal-shape arrays) -> float64 array in [-1, 1]."""
    old_a = np.asarray(old, dtype=np.float64)
    new_a = np.asarray(new, dtype=np.float64)
    if old_a.shape != new_a.shape:
        raise ValueError(f"birdie_reward: old and new must have the same shape, got {old_a.shape} and {new_a.shape}")
    with np.errstate(all="ignore"):
        ratio = (new_a - old_a) / old_a
        r = -100.0 * math.e * np.tanh(math.e * np.sqrt(new_a * old_a) * ratio**3)
    return np.clip(np.where(np.isnan(r), 0.0, r), -1.0, 1.0)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread (restored after): the reward model's tensors are tiny, and waking a
    thread pool for each small op costs far more than it saves (badly so on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Block(nn.Module):
    def __init__(self, hidden: int, layer: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.mixer = GatedSSM(hidden) if layer == "gated" else Attention(hidden, rotary=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        y, state = self.mixer(self.norm1(x), state, return_final_state=True)
        x = x + y
        return x + self.mlp(self.norm2(x)), state

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state = self.mixer.step(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class RewardModel(nn.Module):
    """Causal reward predictor over the evaluation history.

    Args:
        num_arms: n; inputs have 2n features ([loss vector || action]), outputs n (reward per arm).
        hidden: width (paper: 256).
        num_layers: residual blocks (paper: 4).
        layer: "gated" (GatedSSM) or "attention" (causal Attention with rotary positions).

    Shapes: forward x (batch, T, 2n) -> (batch, T, n); step x_t (batch, 2n) -> (batch, n).
    """

    def __init__(self, num_arms: int, hidden: int = 256, num_layers: int = 4, layer: str = "gated") -> None:
        super().__init__()
        for name, v in (("num_arms", num_arms), ("hidden", hidden), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RewardModel: {name} must be a positive int, got {v!r}")
        if layer not in LAYERS:
            raise ValueError(f"RewardModel: unknown layer {layer!r}; expected one of {LAYERS}")
        self.num_arms, self.layer = num_arms, layer
        self.inp = nn.Linear(2 * num_arms, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, num_arms)

    def _check(self, x: object, ndim: int) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != ndim or x.shape[-1] != 2 * self.num_arms:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            shape = "(batch, T, 2 * num_arms)" if ndim == 3 else "(batch, 2 * num_arms)"
            raise ValueError(f"RewardModel: x must have shape {shape} with 2 * num_arms = {2 * self.num_arms}, "
                             f"got {got}")
        return x

    def init_state(self, batch_size: int) -> list[LayerState]:
        return [b.mixer.init_state(batch_size) for b in self.blocks]

    @state_kwargs
    def forward(
        self, x: Tensor, initial_state: list[LayerState] | None = None, *, return_final_state: bool = False
    ):
        """x: (batch, T, 2n) -> predicted rewards (batch, T, n), or (rewards, final state) if
        ``return_final_state``."""
        h = self.inp(self._check(x, 3))
        states = []
        for i, block in enumerate(self.blocks):
            h, s = block(h, None if initial_state is None else initial_state[i])
            states.append(s)
        y = self.out(self.norm(h))
        return (y, states) if return_final_state else y

    def step(self, x_t: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """x_t: (batch, 2n) -> (rewards (batch, n), new state)."""
        h = self.inp(self._check(x_t, 2))
        new = []
        for block, s in zip(self.blocks, state, strict=True):
            h, s = block.step(h, s)
            new.append(s)
        return self.out(self.norm(h)), new

    @torch.no_grad()
    @single_thread()
    def predict_next(self, history: Tensor, queries: Tensor) -> Tensor:
        """Predicted reward of each query step after a shared history.

        history: (T, 2n), T >= 0, the past evaluations; queries: (N, 2n) candidate next steps -> (N, n). The
        history runs once; its state is copied to the N candidates, each taking one recurrent step.
        """
        n = self._check(queries, 2).shape[0]
        if history.ndim != 2 or history.shape[-1] != 2 * self.num_arms:
            raise ValueError(f"RewardModel.predict_next: history must have shape (T, {2 * self.num_arms}), "
                             f"got {tuple(history.shape)}")
        if history.shape[0] == 0:
            state = self.init_state(n)
        else:
            _, state = self.forward(history[None], return_final_state=True)
            state = [s.map(lambda t: t.expand(n, *t.shape[1:]).contiguous()) for s in state]
        return self.step(queries, state)[0]

    @single_thread()
    def fit(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, steps: int, *,
            max_grad_norm: float = 1.0) -> float:
        """``steps`` full-batch MSE steps on x (1, T, 2n) -> y (1, T, n); returns the last loss."""
        self.train()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.forward(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
            optimizer.step()
        self.eval()
        return float(loss.detach())

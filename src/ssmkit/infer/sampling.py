"""Next-token selection: greedy argmax, or sampling with temperature, top-k and top-p (nucleus) filtering.

Sampling is inverse-CDF sampling from one uniform number per row, so a row's token depends only on its own
logits and its own uniform: with one seeded generator per row, a row samples the same tokens whatever else is
in the batch.

    tokens = select_tokens(logits, temperature=0.0)                           # greedy
    tokens = select_tokens(logits, temperature=0.8, top_p=0.9, uniforms=u)    # u: (batch,) in [0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_sampling_options(temperature: object, top_k: object, top_p: object, vocab_size: int) -> None:
    """Validate the options of :func:`select_tokens`; errors name the argument and the accepted values."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab_size}], got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Scaled and filtered logits in float64: logits (batch, vocab) -> (batch, vocab), -inf where removed.

    Order: divide by ``temperature`` (> 0), keep the ``top_k`` largest (ties with the k-th largest are kept),
    then keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one).
    """
    x = logits.to(torch.float64) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(torch.softmax(x, dim=-1), dim=-1, descending=True, stable=True)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x


def sample_from_logits(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling: logits (batch, vocab) (-inf = excluded), uniforms (batch,) in [0, 1) ->
    tokens (batch,) int64. Token j is chosen when u falls in its slice of the cumulative distribution (tokens in
    vocabulary order), so a row's token depends only on that row."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(device=probs.device, dtype=torch.float64).unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # guard against u * total rounding up to total: fall back to the last token with positive probability
    last = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), dim=-1)
    return torch.minimum(idx, last)


def select_tokens(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    uniforms: Tensor | None = None,
) -> Tensor:
    """The next token per row: logits (batch, vocab) -> (batch,) int64.

    ``temperature == 0``: greedy (argmax; the first on ties; top_k/top_p cannot change it). Otherwise sample
    from the filtered distribution using ``uniforms`` (batch,) in [0, 1) (required).
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if uniforms is None:
        raise ValueError("uniforms must be given when sampling (temperature > 0)")
    return sample_from_logits(filter_logits(logits, temperature, top_k, top_p), uniforms)


class RowRandom:
    """Uniform draws for sampling: one per active row per step.

    seed None: torch's global generator; an int: one generator for the whole batch (reproducible, but a row's
    draws depend on its position in the batch); a sequence of ints (one per row): one generator per row, so a
    row's draws are the same whatever else is in the batch.
    """

    def __init__(self, seed: int | Sequence[int] | None, batch: int) -> None:
        self.shared: torch.Generator | None = None
        self.rows: list[torch.Generator] | None = None
        if seed is None:
            return
        if isinstance(seed, int) and not isinstance(seed, bool):
            self.shared = torch.Generator().manual_seed(seed)
            return
        ok = isinstance(seed, Sequence) and not isinstance(seed, str) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seed)
        if not ok or len(seed) != batch:
            got = f"{len(seed)} values" if ok else repr(seed)
            raise ValueError(f"seed must be None, an int or a sequence of {batch} ints (one per row), got {got}")
        self.rows = [torch.Generator().manual_seed(s) for s in seed]

    def draw(self, active: Tensor) -> Tensor:
        """Uniforms (n,) float64 in [0, 1) for the original rows ``active`` (n,)."""
        if self.rows is not None:
            return torch.stack([torch.rand((), dtype=torch.float64, generator=self.rows[int(i)])
                                for i in active])
        return torch.rand(active.shape[0], dtype=torch.float64, generator=self.shared)

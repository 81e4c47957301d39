"""Mamba-3 under sequence parallelism: the rotation angle and the previous token's key and input are exchanged
exactly, after which the SSM state is affine in its initial state as for the other recurrent layers.

Mamba-3's state is (angle θ, h, k, x): θ_t = θ_{t-1} + dt_t·angles_t (wrapped to [0, 2π)); k, x are the last
token's rotated key and input; h_t = α_t h_{t-1} + β_t x_{t-1} k_{t-1}^T + γ_t x_t k_t^T. θ enters h through
cos/sin, so h is not affine in θ_0, but:

* θ_0 of rank r is exact from small summaries: each rank's angle increase after its last reset s_r (batch, H, S)
  (from the layer's own input projections, with autograd; rank 0 adds its given initial angle if it has no reset)
  and whether it has a reset; one differentiable all-gather, and θ_0 = Σ_{j<r} (Π_{j<i<r} keep_i) s_j, wrapped.
* (k_0, x_0) of rank r is rank r - 1's last token's (k, x): rank r - 1 runs the layer on its last token alone
  from its true angle before that token (differentiable), and one all-gather hands them on.
* given (θ_0, k_0, x_0), h is affine in h_0: the generic summary pass of :mod:`.sequence_recurrent` applies.

Communication per layer and step: batch·H·(S + 2·(N + P)·R) values and 8·(1 + batch) bytes; cost: one more
input projection of the shard and one one-token step. ``reverse=True`` is not supported.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers.mamba3 import Mamba3
from .sequence_comm import all_gather, all_gather_autograd, group_rank_size

GIVEN = ("angle", "k", "x")


def _wrap(th: Tensor) -> Tensor:
    """θ mod 2π (as the op wraps it; the floor carries no gradient)."""
    return th - (2 * math.pi * torch.floor(th / (2 * math.pi))).detach()


def given_fields(layer: Mamba3, x: Tensor, reset: Tensor | None, zero: dict[str, Tensor],
                 group: dist.ProcessGroup | None, init: dict[str, Tensor] | None, local) -> dict[str, Tensor]:
    """The true (angle, k, x) entering this rank's shard (differentiable w.r.t. earlier ranks' inputs and the
    weights); ``init``: rank 0's given initial state or None; ``local``: the layer's own forward."""
    rank, _ = group_rank_size(group)
    batch, length, _ = x.shape
    _, _, dt, _, _, _, _, angles = layer._inputs(x)
    inc = (dt[..., None] * angles).to(zero["angle"].dtype)  # (batch, length, H, S)
    if reset is None:
        after = inc
        keep = torch.ones(batch, dtype=torch.long, device=x.device)
    else:  # increments from the last reset on (a reset zeroes the angle before its own increment)
        idx = torch.arange(length, device=x.device)
        last = torch.where(reset, idx, -1).max(1).values
        after = inc * (idx[None, :] >= last[:, None]).to(inc.dtype)[..., None, None]
        keep = (~reset.any(1)).long()
    s = after.sum(1)  # (batch, H, S)
    start = zero if init is None else init
    # rank 0 folds its given initial angle into the summary it sends: later ranks start their sum from zero
    sent = s if init is None else s + start["angle"] * keep.to(s.dtype).view(batch, 1, 1)
    flags = all_gather(keep, group)  # (P, batch)
    sums = all_gather_autograd(sent, group)  # (P, batch, H, S)
    th = start["angle"] if rank == 0 else torch.zeros_like(s)
    for j in range(rank):
        th = th * flags[j].to(th.dtype).view(batch, 1, 1) + sums[j]
    th = _wrap(th) + sums[rank:].sum() * 0  # every rank keeps the all-gather's backward in its graph
    # this rank's true angle before its last token, then that token alone gives its (k, x)
    keep_last = torch.ones_like(keep) if reset is None else (~reset[:, :-1].any(1)).long()
    before = th * keep_last.to(th.dtype).view(batch, 1, 1) + (after.sum(1) - after[:, -1])
    state = dataclasses.replace(layer.init_state(batch, dtype=zero["angle"].dtype), angle=_wrap(before))
    _, fin = local(layer, x[:, -1:], state, reset=None if reset is None else reset[:, -1:], return_final_state=True)
    kx = [all_gather_autograd(getattr(fin, n), group) for n in ("k", "x")]  # (P, batch, ...)
    out = {"angle": th}
    for n, g in zip(("k", "x"), kx, strict=True):
        out[n] = (start[n] if rank == 0 else g[rank - 1]) + g.sum() * 0
    return out

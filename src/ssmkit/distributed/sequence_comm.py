"""Collectives for sequence parallelism: the group's rank and size, all-gathers (plain and differentiable) and
the one-hop exchange with the neighbouring ranks that ring attention uses.

Complex tensors travel as their real views (gloo has no complex types).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ``group=None`` is the default (WORLD) group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def all_gather(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Not differentiable: every rank's ``t`` (same shape everywhere), stacked: (P, *t.shape)."""
    _, size = group_rank_size(group)
    src = _real(t.detach()).contiguous()
    out = torch.empty((size, *src.shape), dtype=src.dtype, device=src.device)
    dist.all_gather(list(out.unbind(0)), src, group=group)
    return torch.view_as_complex(out) if t.is_complex() else out


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather. Each rank's loss sees every rank's tensor, so the gradient of rank j's input
    is the sum over ranks of their gradients for slot j (an all-reduce of the stacked gradients)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = group_rank_size(group)[0]
        return all_gather(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = _real(grad).contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        g = torch.view_as_complex(g) if grad.is_complex() else g
        return g[ctx.rank], None


def all_gather_autograd(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable all-gather: (P, *t.shape); see :class:`_AllGather`."""
    return _AllGather.apply(t, group)


def _peer(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def exchange(send: Tensor | None, recv: Tensor | None, group: dist.ProcessGroup | None, tag: int,
             backward: bool = False) -> None:
    """Send ``send`` to the next rank and fill ``recv`` from the previous one (either may be None); with
    ``backward`` the directions swap (to the previous, from the next). Both transfers are posted before waiting."""
    rank, _ = group_rank_size(group)
    dst, src = (rank - 1, rank + 1) if backward else (rank + 1, rank - 1)
    works = []
    if send is not None:
        works.append(dist.isend(_real(send).contiguous(), _peer(group, dst), group=group, tag=tag))
    if recv is not None:
        works.append(dist.irecv(_real(recv), _peer(group, src), group=group, tag=tag))
    for w in works:
        w.wait()

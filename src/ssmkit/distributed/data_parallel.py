"""Data parallelism on ``torch.distributed``: shard a global batch, wrap a model, share values between ranks.

A global batch of ``B`` rows is split into ``world_size`` contiguous shards of ``B / world_size`` rows: rank ``r``
trains on rows ``[r B / W, (r + 1) B / W)`` (:func:`shard_rows`), each shard in ``grad_accum`` micro-batches,
so ``B`` must be a multiple of ``world_size * grad_accum`` (:func:`check_global_batch`). The model is wrapped in
``DistributedDataParallel`` (:func:`wrap_model`), which averages gradients over the ranks; a caller that
weights each micro-batch's mean loss by ``world_size * scored / global_scored`` gets exactly the gradient of
the global batch's mean loss. Every helper here is a collective: all ranks must call it in the same order.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
#: distance between the seeds of consecutive ranks' RNG streams (a prime, apart from the data epochs' stride)
RANK_SEED_STRIDE = 7_919_009


def check_global_batch(batch_size: int, world_size: int, grad_accum: int = 1, *,
                       what: str = "world size") -> None:
    """Raise ValueError unless the global ``batch_size`` splits into ``world_size`` x ``grad_accum`` equal
    micro-batches (``what`` names ``world_size`` in the message, e.g. "data-parallel size")."""
    for name, v in (("batch_size", batch_size), ("world_size", world_size), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if batch_size % (world_size * grad_accum):
        raise ValueError(f"train.batch_size={batch_size} is the global batch and must be a multiple of {what} "
                         f"{world_size} x train.grad_accum {grad_accum} = {world_size * grad_accum} (each "
                         f"data-parallel rank trains batch_size / {world_size} rows in grad_accum micro-batches)")


def data_parallel_layout(world_size: int, rank: int, sequence_parallel: int = 1) -> tuple[int, int]:
    """(data-parallel size, data-parallel rank) when consecutive groups of ``sequence_parallel`` ranks share one
    shard of rows (rank r is in group r // sequence_parallel). Raises ValueError unless it divides the world."""
    if isinstance(sequence_parallel, bool) or not isinstance(sequence_parallel, int) or sequence_parallel < 1:
        raise ValueError(f"train.sequence_parallel must be an int >= 1, got {sequence_parallel!r}")
    if world_size % sequence_parallel:
        raise ValueError(f"train.sequence_parallel={sequence_parallel} must divide the world size {world_size} "
                         f"(world size = data-parallel size x sequence_parallel)")
    return world_size // sequence_parallel, rank // sequence_parallel


def sequence_parallel_group(sequence_parallel: int) -> dist.ProcessGroup:
    """This rank's group of ``sequence_parallel`` consecutive ranks (every rank creates every group, in order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    data_parallel_layout(world, rank, sequence_parallel)
    mine = None
    for start in range(0, world, sequence_parallel):
        group = dist.new_group(list(range(start, start + sequence_parallel)))
        if start <= rank < start + sequence_parallel:
            mine = group
    assert mine is not None
    return mine


def shard_rows(batch: Mapping[str, Tensor], rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank ``rank``'s contiguous share of every tensor of ``batch`` along dim 0 (rows / world_size each)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = next(iter(batch.values())).shape[0]
    if n % world_size:
        raise ValueError(f"a batch of {n} rows cannot be split into {world_size} equal shards")
    for k, v in batch.items():
        if v.shape[0] != n:
            raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows but the batch has {n}")
    size = n // world_size
    return {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own RNG stream (dropout and other per-rank draws); rank 0 keeps ``seed``."""
    return seed + RANK_SEED_STRIDE * rank


def wrap_model(model: nn.Module, device: torch.device | str = "cpu") -> DistributedDataParallel:
    """``DistributedDataParallel(model)``: rank 0's parameters are broadcast to all ranks now, and every
    backward run through the wrapper's forward averages the gradients over the ranks (buffers, constants in
    ssmkit models, are broadcast once with the parameters and not again at every forward)."""
    dev = torch.device(device)
    ids = [dev] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks in one flat all-reduce (for backward passes that bypass the DDP
    wrapper's forward, e.g. chunked training). Every rank must hold gradients for the same parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise float64 sum of ``values`` over all ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (other ranks' arguments are ignored)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; an exception it raises is raised on every
    rank (so all ranks fail together instead of waiting for one another)."""
    outcome: tuple[bool, Any] = (True, None)
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            try:
                pickle.dumps(e)
                outcome = (False, e)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: send its text
                outcome = (False, RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
    ok, value = broadcast_from_main(outcome)
    if not ok:
        raise value
    return value

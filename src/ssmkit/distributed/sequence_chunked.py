"""Chunked training under sequence parallelism: one long sequence, cut into chunks of ``chunk_len`` positions,
each chunk sharded over the P ranks of a group, in bounded memory per rank.

    stats = sequence_parallel_chunked_backward(model, {"input_ids": ids, "labels": labels}, 65536, group)
    # every parameter's .grad now holds (accumulates) d(mean loss over the whole sequence)/d(parameter)

Every rank holds the whole batch (ids and labels: 16 bytes per token); rank r runs its contiguous piece of each
chunk through :class:`~.sequence.SequenceParallel` (its exact distributed form). It is the algorithm of
:func:`ssmkit.train.chunked.chunked_loss_backward` with a chunk spread over the group:

1. Pass 1 (no grad), chunks in order: rank 0 starts chunk c from the model state entering it; every rank gets
   the true state after its piece; rank P - 1's (the state after chunk c) goes to rank 0 (one point-to-point
   send of the model state), which keeps it for pass 2. Every layer keeps its exchanged summary (the true state
   entering this rank's piece and the later ranks' decays: :func:`~.sequence_recurrent.summary_cache`).
2. Pass 2, chunks in reverse: chunk c is recomputed with a graph, reusing the summaries (no summary pass);
   rank 0's incoming state is a leaf; rank P - 1 backpropagates, besides its piece of the loss, the gradient
   of its outgoing state that rank 0 computed for chunk c + 1 (one point-to-point send). The loss is the sum
   of cross entropies over a piece's scored positions divided by the whole sequence's scored positions, so the
   pieces' losses add up to the mean.

Memory per rank: the activations of one piece (chunk_len / P positions) plus rank 0's saved states (one model
state per chunk), so P ranks with the same ``chunk_len`` use about 1/P of one process's activation memory.
Communication per chunk: the layers' sequence-parallel exchanges (independent of the length) plus one model state
each way. With ``sum_gradients`` the new gradients are summed over the group at the end (one flat all-reduce),
so every rank ends with the one-process gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .heap import bound_heap, trim_heap
from .sequence import SequenceParallel, shard_bounds
from .sequence_comm import _peer, _real, group_rank_size
from .sequence_recurrent import summary_cache

IGNORE_INDEX = -100


def _send(tensors: list[Tensor], dst: int, group: dist.ProcessGroup | None) -> None:
    for t in tensors:
        dist.send(_real(t.detach()).contiguous(), _peer(group, dst), group=group)


def _recv(templates: list[Tensor], src: int, group: dist.ProcessGroup | None) -> list[Tensor]:
    out = []
    for t in templates:
        buf = torch.empty_like(_real(t))
        dist.recv(buf, _peer(group, src), group=group)
        out.append(torch.view_as_complex(buf) if t.is_complex() else buf)
    return out


def _with_tensors(template: Any, values: list[Tensor]) -> Any:
    """``template`` (a ModelState) with its tensors replaced, in ``tensors()`` order, by ``values``."""
    it = iter(values)
    return template.map(lambda _: next(it))


def sequence_parallel_chunked_backward(
    model: nn.Module, batch: Mapping[str, Tensor], chunk_len: int, group: dist.ProcessGroup | None = None, *,
    loss_scale: float = 1.0, sum_gradients: bool = True, bounded_heap: bool = True,
) -> dict[str, Any]:
    """Accumulate into ``.grad`` the gradient of ``loss_scale`` × the whole sequence's mean next-token loss.

    Args:
        model: a CausalLM whose sequence layers are recurrent and supported by :class:`SequenceParallel`.
        batch: the same on every rank: ``input_ids`` (batch, length) int, ``labels`` (batch, length) int
            (-100 ignored; labels[:, t] is position t's target), optional ``reset`` (batch, length) bool.
        chunk_len: positions per chunk (each rank runs about chunk_len / P of them); every chunk, the last
            included, must have at least P positions.
        group: the sequence-parallel process group (None: the whole world).
        loss_scale: multiplies the loss before backward.
        sum_gradients: sum the new gradients over the group at the end (otherwise each rank holds its part).
        bounded_heap: fix glibc's mmap threshold for the process first (:func:`.heap.bound_heap`): freed
            activations leave the RSS (per-rank peak growth 835 -> 681 MiB for the benchmark's Mamba LM at 16,384
            positions per piece) at the cost of page faults on every large allocation (CPU +14% per rank there).

    Returns: {"loss": the whole-sequence mean loss (float, every rank), "tokens", "chunks", "chunk_len",
    "state_bytes": bytes of the states rank 0 saved, "p2p_bytes": bytes this rank sent point to point}.
    """
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
        raise ValueError(f"loss_scale must be a finite number, got {loss_scale!r}")
    unknown = sorted(set(batch) - {"input_ids", "labels", "reset"})
    if unknown:
        raise ValueError(f"batch has unknown keys {unknown}; expected input_ids, labels and optionally reset")
    ids, labels, reset = batch.get("input_ids"), batch.get("labels"), batch.get("reset")
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
        raise ValueError("batch['input_ids'] must be an integer tensor (batch, length)")
    if not isinstance(labels, Tensor) or labels.shape != ids.shape or labels.is_floating_point():
        raise ValueError(f"batch['labels'] must be an integer tensor of shape {tuple(ids.shape)}")
    if reset is not None and (not isinstance(reset, Tensor) or reset.dtype != torch.bool or reset.shape != ids.shape):
        raise ValueError(f"batch['reset'] must be a bool tensor of shape {tuple(ids.shape)}")
    rank, size = group_rank_size(group)
    if bounded_heap:
        bound_heap()
    length = ids.shape[1]
    bounds = [(s, min(s + chunk_len, length)) for s in range(0, length, chunk_len)]
    if bounds[-1][1] - bounds[-1][0] < size:
        raise ValueError(f"chunk_len={chunk_len} leaves a last chunk of {bounds[-1][1] - bounds[-1][0]} positions, "
                         f"fewer than the {size} ranks of the group; choose another chunk_len")
    pieces = [(s + a, s + b) for s, e in bounds for a, b in [shard_bounds(e - s, size)[rank]]]
    total = int((labels != IGNORE_INDEX).sum())
    if total == 0:
        return {"loss": 0.0, "tokens": 0, "chunks": 0, "chunk_len": chunk_len, "state_bytes": 0, "p2p_bytes": 0}
    sp = SequenceParallel(model, group)
    template = model.init_state(ids.shape[0])
    before = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters() if p.requires_grad}
    n = len(bounds)
    p2p = 0

    summaries: dict = {}  # each layer's exchanged summary of each chunk, from pass 1 for pass 2

    def run(c: int, state: Any, *, grad: bool, want_state: bool):
        a, b = pieces[c]
        kw = {} if reset is None else {"reset": reset[:, a:b]}
        with torch.set_grad_enabled(grad), summary_cache("replay" if grad else "record", c, summaries):
            return sp(ids[:, a:b], state, return_final_state=want_state, **kw)

    # pass 1: rank 0 keeps the state entering every chunk (received from rank P - 1)
    states: list[Any] = [None] * n
    for c in range(n - 1):
        out = run(c, states[c], grad=False, want_state=True)
        fin = list(out.state.tensors().values())
        if size == 1:
            states[c + 1] = out.state
        elif rank == size - 1:
            _send(fin, 0, group)
            p2p += sum(t.numel() * t.element_size() for t in fin)
        elif rank == 0:
            states[c + 1] = _with_tensors(template, _recv(list(template.tensors().values()), size - 1, group))
        del out
    state_bytes = sum(t.numel() * t.element_size() for s in states if s is not None for t in s.tensors().values())

    # pass 2: chunks in reverse, the outgoing state's gradient travelling from rank 0 (chunk c + 1) to rank P - 1
    loss_sum = 0.0
    grad_out: list[Tensor] | None = None
    for c in range(n - 1, -1, -1):
        trim_heap()  # the previous chunk's freed buffers would stay resident under this one's graph
        if c < n - 1 and rank == size - 1 and size > 1:  # before this chunk's collectives (rank 0 sent it)
            grad_out = _recv(list(template.tensors().values()), 0, group)
        state_in = None if states[c] is None else states[c].map(lambda t: t.detach().requires_grad_())
        out = run(c, state_in, grad=True, want_state=c < n - 1)
        a, b = pieces[c]
        part = F.cross_entropy(out.logits.flatten(0, 1), labels[:, a:b].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / total
        loss_sum += float(part.detach())
        roots, grads = [part * loss_scale], [None]
        if c < n - 1 and rank == size - 1:
            for t, g in zip(out.state.tensors().values(), grad_out or [], strict=False):
                if t.requires_grad:
                    roots.append(t)
                    grads.append(g)
        torch.autograd.backward(roots, grads)
        if rank == 0 and c > 0:
            leaves = list(state_in.tensors().values())
            grad_out = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
            if size > 1:
                _send(grad_out, size - 1, group)
                p2p += sum(t.numel() * t.element_size() for t in grad_out)
        states[c] = None
        del out, roots, state_in
    if size > 1:
        total_loss = torch.tensor([loss_sum], dtype=torch.float64)
        dist.all_reduce(total_loss, group=group)
        loss_sum = float(total_loss)
        if sum_gradients:
            _sum_new_gradients(before, group)
    return {"loss": loss_sum, "tokens": total, "chunks": n, "chunk_len": chunk_len, "state_bytes": int(state_bytes),
            "p2p_bytes": p2p}


def _sum_new_gradients(before: dict[nn.Parameter, Tensor | None], group: dist.ProcessGroup | None) -> None:
    """Sum over the group the part of every ``.grad`` added since ``before`` (one flat all-reduce)."""
    params = list(before)
    news = [(p.grad if p.grad is not None else torch.zeros_like(p)) - (0 if before[p] is None else before[p])
            for p in params]
    if not news:
        return
    flat = torch.cat([t.reshape(-1) for t in news])
    dist.all_reduce(flat, group=group)
    i = 0
    for p, t in zip(params, news, strict=True):
        k = t.numel()
        summed = flat[i:i + k].view_as(t)
        p.grad = summed if before[p] is None else before[p] + summed
        i += k

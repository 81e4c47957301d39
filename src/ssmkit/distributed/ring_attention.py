"""Exact causal ring attention for :class:`ssmkit.layers.Attention` (mask "causal" or "sliding").

Rank r holds queries, keys and values of its contiguous shard. Its own block is attended first; then, for
s = 1 .. r, the K/V block of rank r - s arrives from rank r - 1 (each rank passes on what it holds, one hop per
step: a ring without the wrap-around, since causal queries never see later shards) and is folded in with an
online softmax: running row maximum m (detached: the result does not depend on it), running sum l and
accumulator acc = sum exp(s - m) v; the output is acc / l. Every query sees itself, so m is finite from the
first block and fully masked later blocks add exactly zero.

Segments (``reset``) and rotary positions cross shard boundaries: the global segment id is the number of resets
before the token in the whole sequence, and the position restarts at the latest reset anywhere before it; both
come from one small all-gather (shard length, reset count and last local reset per row). Keys travel with their
segment ids. Gradients flow back along the same hops (:func:`ssmkit.distributed.sequence_comm.pass_next`).

Communication per layer and step: the last rank receives P - 1 blocks of batch * 2 * d_model * L_j values (plus
batch * L_j int64 segment ids), i.e. (P - 1) / P of the sequence's keys and values; the backward sends the same
volume of K/V gradients back. Memory: the scores of the local queries against all earlier keys are kept for the
backward (L_r * L per head), as in the one-process layer's masked attention.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers.attention import Attention
from ..layers.base import to_compute
from .sequence_comm import all_gather, exchange, group_rank_size, pass_next


def _positions(x: Tensor, reset: Tensor | None, group: dist.ProcessGroup | None):
    """(global index (L,), global segment ids (batch, L), rotary positions (batch, L), all lengths (P,))."""
    batch, length, _ = x.shape
    rank, _ = group_rank_size(group)
    dev = x.device
    idx = torch.arange(length, device=dev)
    if reset is None:
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        last = torch.full((batch,), -1, dtype=torch.long, device=dev)
    else:
        count = reset.long().sum(1)
        last = torch.where(reset, idx, -1).max(1).values
    meta = all_gather(torch.cat([torch.tensor([length], device=dev), count, last]), group)  # (P, 1 + 2 batch)
    lengths = meta[:, 0]
    offsets = torch.cumsum(lengths, 0) - lengths
    gidx = offsets[rank] + idx
    prior = meta[:rank, 1:1 + batch].sum(0)
    prev_last = meta[:rank, 1 + batch:]
    prev_start = torch.where(prev_last >= 0, prev_last + offsets[:rank, None], -1)
    prev_start = prev_start.max(0).values if rank > 0 else torch.full((batch,), -1, device=dev)
    if reset is None:
        seg = prior[:, None].expand(batch, length)
        start = prev_start[:, None].expand(batch, length)
    else:
        seg = prior[:, None] + reset.long().cumsum(1)
        start = torch.maximum(torch.where(reset, gidx, -1).cummax(1).values, prev_start[:, None])
    pos = gidx - start.clamp(min=0)
    return gidx, seg.contiguous(), pos, lengths


def ring_attention_forward(layer: Attention, x: Tensor, reset: Tensor | None,
                           group: dist.ProcessGroup | None) -> Tensor:
    """The local shard of the one-process ``layer(x_full, reset=reset_full)``: x (batch, L_r, d_model)."""
    name = type(layer).__name__
    if layer.mask not in ("causal", "sliding"):
        raise NotImplementedError(f"{name}: sequence parallel attention supports mask 'causal' and 'sliding', "
                                  f"got {layer.mask!r}")
    rank, _ = group_rank_size(group)
    batch, length, _ = x.shape
    gidx, seg, pos, lengths = _positions(x, reset, group)
    total = int(lengths.sum())
    if layer.max_cache is not None and layer.window is None and total > layer.max_cache:
        raise ValueError(f"{name}: {total} tokens exceed max_cache={layer.max_cache}")
    H, Dh = layer.n_heads, layer.head_dim
    qkv = to_compute(layer, layer.qkv(x))
    q, k, v = qkv.view(batch, length, 3, H, Dh).permute(2, 0, 3, 1, 4)
    if layer.rotary:
        q, k = layer._rotate(q, pos), layer._rotate(k, pos)
    q = q * (1.0 / math.sqrt(Dh))

    def scores(kb: Tensor, kseg: Tensor, kidx: Tensor) -> Tensor:
        s = q @ kb.transpose(-1, -2)
        rel = gidx[:, None] - kidx[None, :]
        ok = (seg[:, :, None] == kseg[:, None, :]) & (rel >= 0)[None]
        if layer.window is not None:
            ok = ok & (rel < layer.window)[None]
        return s.masked_fill(~ok[:, None], float("-inf"))

    s = scores(k, seg, gidx)
    m = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - m)
    lsum, acc = p.sum(-1, keepdim=True), p @ v
    block, kseg = torch.cat([k, v], -1), seg
    offsets = torch.cumsum(lengths, 0) - lengths
    for step in range(1, rank + 2):
        if step >= len(lengths):
            break
        send = rank + 1 < len(lengths)
        src = rank - step
        shape = (batch, H, int(lengths[src]), 2 * Dh) if src >= 0 else None
        block = pass_next(block, send, shape, group, tag=2 * step)
        seg_in = torch.empty(batch, int(lengths[src]), dtype=torch.long, device=x.device) if src >= 0 else None
        exchange(kseg if send else None, seg_in, group, tag=2 * step + 1)
        if src < 0:  # send only: tie the pass into the graph so its backward receives the gradient
            acc = acc + block.sum() * 0
            break
        kseg = seg_in
        kidx = offsets[src] + torch.arange(int(lengths[src]), device=x.device)
        kb, vb = block.split(Dh, dim=-1)
        s = scores(kb, kseg, kidx)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True)).detach()
        scale = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        lsum = lsum * scale + p.sum(-1, keepdim=True)
        acc = acc * scale + p @ vb
        m = m_new
    out = acc / lsum
    return layer.out_proj(out.transpose(1, 2).reshape(batch, length, layer.d_model))

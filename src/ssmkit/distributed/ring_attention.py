"""Exact causal ring attention for :class:`ssmkit.layers.Attention` (mask "causal" or "sliding") and
:class:`ssmkit.layers.GQAttention` (LocalGQAttention: its window; grouped K/V heads travel unrepeated).

Rank r holds queries, keys and values of its contiguous shard. Its own block is attended first; then, for
s = 1 .. r, the K/V block of rank r - s arrives from rank r - 1 (each rank passes on what it holds, one hop per
step: a ring without the wrap-around, since causal queries never see later shards). Blocks are combined by their
row log-sum-exp (an online softmax), exactly:

* without segments or a window every block is the own (causal) block or fully visible, and torch's fused CPU
  flash-attention kernels compute each block with its log-sum-exp; the backward runs the fused backward per
  block with the combined output and log-sum-exp, which gives that block's share of every gradient;
* otherwise tiles of ``CHUNK`` queries x the visible keys of a block are computed with a running maximum, sum
  and accumulator (tiles outside the causal/window range are skipped) and recomputed in the backward.

Segments (``reset``) and rotary positions cross shard boundaries: the global segment id is the number of resets
before the token in the whole sequence, and the position restarts at the latest reset anywhere before it; both
come from one small all-gather (shard length, reset count and last local reset per row). Keys travel with their
segment ids. Each block's K/V gradient goes back along the same hops, every rank adding its own part.

Communication per layer and step: rank r < P - 1 sends r + 1 blocks of batch * 2 * d_model * L_j values (plus
batch * L_j int64 segment ids) to rank r + 1, and the backward returns as many K/V gradients. Memory: q, the
output, the log-sum-exp and the received K/V blocks (O(L) per rank); no L_r x L score matrix is kept.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers.attention import Attention
from ..layers.base import to_compute
from ..layers.gqa import GQAttention
from . import ring_prefix
from .sequence_comm import all_gather, exchange, group_rank_size

CHUNK = 256  # queries per score tile: tiles of CHUNK x L_j scores, never L_r x L_j at once


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


def _window(layer: Attention | GQAttention) -> int | None:
    return getattr(layer, "window", None)  # Attention (None unless "sliding"), LocalGQAttention; GQAttention: none


def _project(layer: Attention | GQAttention, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q scaled by the softmax scale (batch, heads, L, head_dim), k, v (batch, kv heads, L, head_dim)), rotary
    applied at the global positions ``pos``."""
    batch, length, _ = x.shape
    if isinstance(layer, Attention):
        H, Dh = layer.n_heads, layer.head_dim
        qkv = to_compute(layer, layer.qkv(x))
        q, k, v = qkv.view(batch, length, 3, H, Dh).permute(2, 0, 3, 1, 4)
        if layer.rotary:
            q, k = layer._rotate(q, pos), layer._rotate(k, pos)
        return q * (1.0 / math.sqrt(Dh)), k, v
    H, Hk, Dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q, k, v = to_compute(layer, layer.q_proj(x), layer.k_proj(x), layer.v_proj(x))
    if layer.key_multiplier != 1.0:
        k = k * layer.key_multiplier
    q = q.view(batch, length, H, Dh).transpose(1, 2)
    k = k.view(batch, length, Hk, Dh).transpose(1, 2)
    v = v.view(batch, length, Hk, Dh).transpose(1, 2)
    if layer.rotary_dim:
        q, k = layer._rotate(q, pos), layer._rotate(k, pos)
    return q * (Dh ** -0.5 if layer.scale is None else layer.scale), k, v


def ring_attention_forward(layer: Attention | GQAttention, x: Tensor, reset: Tensor | None,
                           group: dist.ProcessGroup | None, prefix: Tensor | None = None) -> Tensor:
    """The local shard of the one-process ``layer(x_full, reset=reset_full, prefix_mask=prefix_full)``: x (batch,
    L_r, d_model); ``prefix`` (batch, L_r) bool, this rank's piece of the prefix mask (mask="prefix" only)."""
    name = type(layer).__name__
    if prefix is not None and not (isinstance(layer, Attention) and layer.mask == "prefix"):
        raise ValueError(f"{name}: prefix_mask is only accepted with mask='prefix'")
    rank, _ = group_rank_size(group)
    batch, length, _ = x.shape
    gidx, seg, pos, lengths = _positions(x, reset, group)
    total = int(lengths.sum())
    max_cache = getattr(layer, "max_cache", None)
    if max_cache is not None and _window(layer) is None and total > max_cache:
        raise ValueError(f"{name}: {total} tokens exceed max_cache={max_cache}")
    q, k, v = _project(layer, x, pos)
    ctx = _Ring(group, rank, lengths, gidx, seg, reset is not None, _window(layer), q.shape[1] // k.shape[1])
    if prefix is not None:
        ctx.prefix = prefix
        ctx.recvs, ctx.sends = ring_prefix.plan(prefix, reset, lengths, rank, group)
    out = _RingAttention.apply(q, k, v, ctx).transpose(1, 2).reshape(batch, length, -1)
    return layer.out_proj(out) if isinstance(layer, Attention) else layer.o_proj(out)


class _Ring:
    """What the ring needs besides q, k, v: the group, this rank, all shard lengths, global token indices and
    segment ids of the local tokens, whether segments exist, the sliding window, query heads per K/V head."""

    def __init__(self, group, rank, lengths, gidx, seg, segmented, window, groups=1):
        self.group, self.rank, self.lengths, self.gidx, self.seg = group, rank, lengths, gidx, seg
        self.segmented, self.window, self.groups = segmented, window, groups
        self.offsets = torch.cumsum(lengths, 0) - lengths
        self.prefix, self.recvs, self.sends = None, [], []  # prefix masks: see .ring_prefix

    def key_range(self, rows: slice, kidx: Tensor) -> slice:
        """The keys of a block (global indices ``kidx``, contiguous) that the queries ``rows`` may see at all:
        none after the last query, none before the first query's window; tiles outside are skipped."""
        n = kidx.shape[0]
        first, last = int(self.gidx[rows][0]), int(self.gidx[rows][-1])
        lo = 0 if self.window is None else first - self.window + 1 - int(kidx[0])
        hi = n if self.prefix is not None else last + 1 - int(kidx[0])  # prefix keys may follow the query
        return slice(min(max(lo, 0), n), min(max(hi, 0), n))

    def visible(self, rows: slice, kseg: Tensor, kidx: Tensor, own: bool, kpre: Tensor | None) -> Tensor | None:
        """Bool mask (batch or 1, 1, rows, L_j) of visible keys, or None when all are visible; ``kpre`` (batch,
        L_j): the keys' prefix flags (prefix keys of the segment are visible from every query of it)."""
        if not self.segmented and self.window is None and not own and kpre is None:  # earlier shard, one segment
            return None
        rel = self.gidx[rows, None] - kidx[None, :]
        ok = (rel >= 0) if self.window is None else (rel >= 0) & (rel < self.window)
        ok = ok[None] if kpre is None else ok[None] | kpre[:, None, :]
        if self.segmented or kpre is not None:
            ok = ok & (self.seg[:, rows, None] == kseg[:, None, :])
        return ok[:, None]


def _tile_scores(q: Tensor, kb: Tensor, ok: Tensor | None) -> Tensor:
    s = q @ kb.transpose(-1, -2)
    return s if ok is None else s.masked_fill(~ok, float("-inf"))


class _RingAttention(torch.autograd.Function):
    """Flash-style: the forward keeps only q, the K/V blocks, the output and the row log-sum-exp; the backward
    recomputes each tile's probabilities, and sends each earlier block's K/V gradient back along the hops."""

    @staticmethod
    def forward(fctx, q, k, v, ring: _Ring):  # type: ignore[override]
        rank, lengths, size = ring.rank, ring.lengths, len(ring.lengths)
        batch, heads, _, dh = q.shape
        g = ring.groups  # K/V travel with their own (fewer) heads and are repeated per query head on arrival
        rep = (lambda t: t) if g == 1 else (lambda t: t.repeat_interleave(g, 1))  # noqa: E731
        blocks = [(rep(k), rep(v), ring.seg, ring.gidx, ring.prefix)]  # block s holds the keys of rank - s
        held = (torch.cat([k, v], -1), ring.seg)
        for step in range(1, min(rank + 1, size - 1) + 1):
            src = rank - step
            send = rank + 1 < size
            n = int(lengths[src]) if src >= 0 else 0
            kv = q.new_empty(batch, k.shape[1], n, 2 * dh) if src >= 0 else None
            kseg = torch.empty(batch, n, dtype=torch.long, device=q.device) if src >= 0 else None
            exchange(held[0] if send else None, kv, ring.group, tag=2 * step)
            exchange(held[1] if send else None, kseg, ring.group, tag=2 * step + 1)
            if src < 0:
                break
            held = (kv, kseg)
            kidx = ring.offsets[src] + torch.arange(n, device=q.device)
            blocks.append((rep(kv[..., :dh]), rep(kv[..., dh:]), kseg, kidx, None))
        fctx.hops = len(blocks)  # then the leading prefix runs of later ranks (prefix masks only)
        if ring.prefix is not None:
            later = ring_prefix.fetch_later(k, v, ring.seg, ring.prefix, ring.offsets, ring.recvs, ring.sends,
                                            ring.group)
            blocks += [(rep(kb), rep(vb), kseg, kidx, kpre) for kb, vb, kseg, kidx, kpre in later]
        fctx.ring, fctx.blocks = ring, blocks
        fctx.fused = _fused_ok(q, ring)
        out, lse = _fused_forward(q, blocks) if fctx.fused else _tiled_forward(q, blocks, ring)
        fctx.save_for_backward(q, out, lse)
        return out

    @staticmethod
    def backward(fctx, dout):  # type: ignore[override]
        q, out, lse = fctx.saved_tensors
        ring, blocks = fctx.ring, fctx.blocks
        rank, size = ring.rank, len(ring.lengths)
        if fctx.fused:
            dq, dkv = _fused_backward(dout, q, out, lse, blocks)
        else:
            dq, dkv = _tiled_backward(dout, q, out, lse, blocks, ring)
        if ring.groups > 1:  # the gradient of a repeated K/V head is the sum over its query heads
            dkv = [d.unflatten(1, (-1, ring.groups)).sum(2) for d in dkv]
        if ring.prefix is not None:  # the later ranks' prefix runs: their gradients go straight back
            ring_prefix.return_gradients(dkv[0], dkv[fctx.hops:], ring.recvs, ring.sends, ring.group)
            dkv = dkv[:fctx.hops]
        # block j came from rank - j through every rank between; its gradient goes back the same hops, each rank
        # adding its own part: receive the part of the ranks above (for the block this rank passed on), send down
        for j in range(len(dkv) - 1, -1, -1):
            if rank + 1 < size:
                incoming = torch.empty_like(dkv[j])
                exchange(None, incoming, ring.group, tag=2 * (j + 1), backward=True)
                dkv[j] += incoming
            if j >= 1:
                exchange(dkv[j], None, ring.group, tag=2 * j, backward=True)
        dh = q.shape[-1]
        return dq, dkv[0][..., :dh], dkv[0][..., dh:], None


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _fused_ok(q: Tensor, ring: _Ring) -> bool:
    """Without segments or a window every block is either the own (causal) block or fully visible: torch's
    fused CPU flash-attention kernels, which return the row log-sum-exp, then compute each block."""
    return (_FLASH is not None and _FLASH_BWD is not None and q.device.type == "cpu" and not ring.segmented
            and ring.window is None and ring.prefix is None and q.dtype in (torch.float32, torch.float64))


def _fused_forward(q: Tensor, blocks: list) -> tuple[Tensor, Tensor]:
    """(out, lse): per block o_j, lse_j from the fused kernel, combined as sum_j exp(lse_j - lse) o_j."""
    outs, lses = [], []
    for j, (kb, vb, *_) in enumerate(blocks):
        o, lse = _FLASH(q.contiguous(), kb.contiguous(), vb.contiguous(), 0.0, j == 0, scale=1.0)
        outs.append(o)
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(torch.exp(lj - lse).unsqueeze(-1) * o for o, lj in zip(outs, lses, strict=True))
    return out, lse


def _fused_backward(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, blocks: list) -> tuple[Tensor, list]:
    """The fused backward per block with the combined out and lse gives that block's share of every gradient."""
    dq, dkv = torch.zeros_like(q), []
    for j, (kb, vb, *_) in enumerate(blocks):
        gq, gk, gv = _FLASH_BWD(dout.contiguous(), q.contiguous(), kb.contiguous(), vb.contiguous(),
                                out.contiguous(), lse.contiguous(), 0.0, j == 0, scale=1.0)
        dq += gq
        dkv.append(torch.cat([gk, gv], -1))
    return dq, dkv


def _tiled_forward(q: Tensor, blocks: list, ring: _Ring) -> tuple[Tensor, Tensor]:
    """(out, lse) tile by tile (CHUNK queries x the visible keys of one block) with an online softmax."""
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
    for a in range(0, q.shape[2], CHUNK):
        rows = slice(a, a + CHUNK)
        qc, m, lsum, acc = q[:, :, rows], None, None, None
        for j, (kb_all, vb_all, kseg_all, kidx_all, kpre_all) in enumerate(blocks):
            keys = ring.key_range(rows, kidx_all)
            if keys.start >= keys.stop:
                continue
            kb, vb = kb_all[:, :, keys], vb_all[:, :, keys]
            kseg, kidx = kseg_all[:, keys], kidx_all[keys]
            kpre = None if kpre_all is None else kpre_all[:, keys]
            s = _tile_scores(qc, kb, ring.visible(rows, kseg, kidx, j == 0, kpre))
            m_new = s.amax(-1, keepdim=True) if m is None else torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            if m is None:  # the own block first: every query sees itself, so m is finite from here on
                lsum, acc = p.sum(-1, keepdim=True), p @ vb
            else:
                scale = torch.exp(m - m_new)
                lsum, acc = lsum * scale + p.sum(-1, keepdim=True), acc * scale + p @ vb
            m = m_new
        out[:, :, rows] = acc / lsum
        lse[:, :, rows] = (m + torch.log(lsum)).squeeze(-1)
    return out, lse


def _tiled_backward(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, blocks: list,
                    ring: _Ring) -> tuple[Tensor, list]:
    """Recompute each tile's probabilities from lse; dq and each block's [dk, dv]."""
    dq = torch.zeros_like(q)
    dkv = [torch.zeros(*kb.shape[:-1], 2 * kb.shape[-1], dtype=q.dtype, device=q.device)
           for kb, *_ in blocks]
    delta = (dout * out).sum(-1, keepdim=True)
    for a in range(0, q.shape[2], CHUNK):
        rows = slice(a, a + CHUNK)
        qc, dc, lc = q[:, :, rows], dout[:, :, rows], lse[:, :, rows, None]
        for j, (kb_all, vb_all, kseg_all, kidx_all, kpre_all) in enumerate(blocks):
            keys = ring.key_range(rows, kidx_all)
            if keys.start >= keys.stop:
                continue
            kb, vb = kb_all[:, :, keys], vb_all[:, :, keys]
            kpre = None if kpre_all is None else kpre_all[:, keys]
            ok = ring.visible(rows, kseg_all[:, keys], kidx_all[keys], j == 0, kpre)
            p = torch.exp(_tile_scores(qc, kb, ok) - lc)
            dh = kb.shape[-1]
            dkv[j][:, :, keys, dh:] += p.transpose(-1, -2) @ dc
            ds = p * (dc @ vb.transpose(-1, -2) - delta[:, :, rows])
            dq[:, :, rows] += ds @ kb
            dkv[j][:, :, keys, :dh] += ds.transpose(-1, -2) @ qc
    return dq, dkv

"""Prefix masks (PrefixLM, :class:`ssmkit.layers.Attention` with mask="prefix") in ring attention.

A query sees the keys before it in its segment and every prefix key of its segment. Prefix tokens are contiguous
at the start of a segment, so only prefix queries see later keys, and only the prefix keys of their own segment.
On rank r those can live on later ranks j > r: the *leading run* of rank j (its first tokens that are prefix
tokens continuing the segment of the shard before, at most ``n_j`` of them over the batch rows), and only when
rank r ends in a prefix token and every rank between r and j is one whole leading run. Every rank computes this
plan from one small all-gather, rank j sends its leading run's K/V, segment ids and prefix flags straight to each
rank r that needs them, and in the backward rank r sends that block's K/V gradient straight back to rank j.

Communication: the leading runs only (at most the prefix length of the segment crossing the boundary), so a
prefix confined to one shard costs nothing beyond the all-gather of 2 int64 per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .sequence_comm import _peer, _real, all_gather

TAGS = {"kv": 101, "seg": 102, "pre": 103, "grad": 104}


def leading_run(prefix: Tensor, reset: Tensor | None) -> Tensor:
    """(batch,) int64: the first tokens of the shard that are prefix tokens of the segment open before it (a reset
    at a token starts a new segment, so the run stops there)."""
    ok = prefix if reset is None else prefix & ~reset
    return ok.long().cumprod(1).sum(1)


def plan(prefix: Tensor, reset: Tensor | None, lengths: Tensor, rank: int,
         group: dist.ProcessGroup | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(blocks to receive: [(src rank, keys)], blocks to send: [(dst rank, keys)]), the same plan on every rank."""
    lead = int(leading_run(prefix, reset).max())
    ends = int(prefix[:, -1].any())
    meta = all_gather(torch.tensor([lead, ends], device=prefix.device), group)  # (P, 2)
    n, size = meta[:, 0].tolist(), len(lengths)
    pairs = []
    for r in range(size):
        if not meta[r, 1]:
            continue
        for j in range(r + 1, size):
            if n[j] > 0:
                pairs.append((r, j))
            if n[j] < int(lengths[j]):  # the run stops inside rank j: no later rank continues it
                break
    return [(j, n[j]) for r, j in pairs if r == rank], [(r, n[j]) for r, j in pairs if j == rank]


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def fetch_later(k: Tensor, v: Tensor, seg: Tensor, prefix: Tensor, offsets: Tensor, recvs: list, sends: list,
                group: dist.ProcessGroup | None) -> list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Send this rank's leading run to the ranks that need it; receive the later ranks' runs as blocks
    (k, v (batch, kv heads, n, head_dim), segment ids (batch, n), global indices (n,), prefix flags (batch, n))."""
    works, got = [], []
    for dst, n in sends:
        peer = _peer(group, dst)
        works.append(dist.isend(torch.cat([k[:, :, :n], v[:, :, :n]], -1).contiguous(), peer, group=group,
                                tag=TAGS["kv"]))
        works.append(dist.isend(seg[:, :n].contiguous(), peer, group=group, tag=TAGS["seg"]))
        works.append(dist.isend(prefix[:, :n].to(torch.uint8).contiguous(), peer, group=group, tag=TAGS["pre"]))
    batch, heads, _, dh = k.shape
    for src, n in recvs:
        peer = _peer(group, src)
        kv = k.new_empty(batch, heads, n, 2 * dh)
        kseg = torch.empty(batch, n, dtype=torch.long, device=k.device)
        kpre = torch.empty(batch, n, dtype=torch.uint8, device=k.device)
        works += [dist.irecv(kv, peer, group=group, tag=TAGS["kv"]),
                  dist.irecv(kseg, peer, group=group, tag=TAGS["seg"]),
                  dist.irecv(kpre, peer, group=group, tag=TAGS["pre"])]
        got.append((kv, kseg, offsets[src] + torch.arange(n, device=k.device), kpre))
    _wait(works)
    return [(kv[..., :dh], kv[..., dh:], kseg, kidx, kpre.bool()) for kv, kseg, kidx, kpre in got]


def return_gradients(dkv_own: Tensor, dkv_later: list[Tensor], recvs: list, sends: list,
                     group: dist.ProcessGroup | None) -> None:
    """Send each later block's [dk, dv] back to its rank; add the gradients other ranks computed for this rank's
    leading run to ``dkv_own`` (batch, kv heads, L_r, 2 head_dim) in place."""
    works, incoming = [], []
    for (src, _), d in zip(recvs, dkv_later, strict=True):
        works.append(dist.isend(_real(d).contiguous(), _peer(group, src), group=group, tag=TAGS["grad"]))
    for dst, n in sends:
        buf = dkv_own.new_empty(*dkv_own.shape[:2], n, dkv_own.shape[-1])
        works.append(dist.irecv(buf, _peer(group, dst), group=group, tag=TAGS["grad"]))
        incoming.append((n, buf))
    _wait(works)
    for n, buf in incoming:
        dkv_own[:, :, :n] += buf

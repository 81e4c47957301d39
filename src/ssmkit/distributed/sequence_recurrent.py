"""Exact sequence parallelism for recurrent layers with a diagonal state (Mamba, Mamba2, S4D, GatedSSM, RGLRU).

Rank r holds the contiguous shard x_r (batch, L_r, d_model) of one sequence. The layer's state has two kinds of
fields:

* a short convolution's state (``conv``: the last d_conv - 1 conv inputs, time last) is a halo: it is the conv
  input of the previous tokens, a per-token function of x. Each rank runs the layer on its own last d_conv - 1
  tokens from a zero state (cheap), the final ``conv`` fields are all-gathered (differentiable) with the shard
  lengths and "has a reset" flags, and rank r composes the true halo from ranks < r: a shard shorter than the
  halo shifts the earlier halo in, a reset anywhere in a shard cuts it.
* every other field h is a diagonal linear recurrence given the halo: h_final = M ⊙ h0 + b. With the true halo,
  one batched no-grad pass with h0 = 0 and h0 = 1 gives b and M (M = h1 - b; a reset in the shard makes M 0);
  it runs in pieces of SUMMARY_CHUNK tokens, passing the state, so its memory is bounded.
  (M, b) are all-gathered, an exclusive scan gives the true h0 of every rank, and the layer runs once more from
  (halo, h0) with autograd: its output is the one-process output of the shard.

Backward (:class:`_ShardPass`): the gradient G_r of the loss w.r.t. h0_r obeys G_r = a_r + conj(M_r) ⊙ G_{r+1},
where a_r is the h0-gradient of the local output alone (a pruned backward; rank 0's is never used and is not
computed). The a_r are all-gathered, a reverse
exclusive scan gives G_{r+1}, and one backward of (y_r, h_final_r) with (dL/dy_r, G_{r+1}) gives the exact input,
halo and weight gradients, because h_final_r of that pass is the very function M_r ⊙ h0 + b_r of (x, halo, θ).

Communication per layer and step does not depend on L: the halo (P * batch * conv_channels * (d_conv - 1)) and
(M, b) forward (P * 2 * batch * state size), a_r backward (P * batch * state size), all-reduce of the halo
gradients, and 2 + batch int64 per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers.base import LayerState, SequenceLayer
from ..layers.griffin import GriffinRecurrent
from ..layers.mamba3 import Mamba3
from . import sequence_dense, sequence_mamba3
from .heap import heap_bounded, trim_heap
from .sequence_comm import all_gather, all_gather_autograd, group_rank_size

#: state fields that hold the last inputs of a convolution, time last (Mamba/Mamba2 conv, H3 shift,
#: LongConv buffer; Griffin's conv has time on dim 1, :func:`halo_time_dim`) and int64 counters of the tokens of
#: the current segment (Griffin's ``pos``), both composed exactly from small all-gathered summaries; every other
#: field is a diagonal linear recurrence
HALO_FIELDS = ("conv", "shift", "buffer")
COUNTER_FIELDS = ("pos",)
#: tokens per piece of the no-grad summary pass (state passed from piece to piece), so that its transient
#: memory does not grow with the shard. 2048 rather than 8192: the pieces' freed buffers stay in the process's heap
#: (RSS) under the true pass; measured for one Mamba layer, d_model 256, 65,536 tokens on 2 ranks, the growth of
#: peak RSS per rank fell from 819 to 800 MB (0.558x -> 0.545x one process's 1468 MB)
SUMMARY_CHUNK = 2048


#: (mode, key, store) while :func:`summary_cache` is active
_CACHE: ContextVar[tuple[str, object, dict] | None] = ContextVar("sp_summary_cache", default=None)


@contextmanager
def summary_cache(mode: str, key: object, store: dict) -> Iterator[None]:
    """Record (``mode="record"``) each layer's exchanged summary (its true initial state and the decays M of the
    later ranks) under ``(key, layer)`` in ``store``, or reuse it (``"replay"``) instead of running the summary pass
    and its all-gather again: chunked training recomputes every chunk once with a graph after a no-grad pass over
    the same inputs and states, so pass 2 needs no summaries of its own."""
    if mode not in ("record", "replay"):
        raise ValueError(f"summary_cache: mode must be 'record' or 'replay', got {mode!r}")
    token = _CACHE.set((mode, key, store))
    try:
        yield
    finally:
        _CACHE.reset(token)


def _fields(state: LayerState) -> dict[str, Tensor]:
    out = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if not all(isinstance(t, Tensor) for t in out.values()):
        raise TypeError(f"sequence parallel: {type(state).__name__} has nested or non-tensor fields; only flat "
                        f"states of tensors are supported")
    return out


def halo_time_dim(layer: SequenceLayer, name: str) -> int:
    """The time axis of halo field ``name``: last, except Griffin's conv state (batch, conv_width - 1, width)."""
    return 1 if isinstance(layer, GriffinRecurrent) and name == "conv" else -1


def _shift_in(halo: Tensor, length: int, dim: int = -1) -> Tensor:
    """The part of an initial conv state still visible after ``length`` more tokens, aligned oldest first
    (time along ``dim``)."""
    width = halo.shape[dim]
    if length >= width:
        return torch.zeros_like(halo)
    kept = halo.narrow(dim, length, width - length)
    return torch.cat([kept, torch.zeros_like(halo.narrow(dim, 0, length))], dim=dim)


def _since_reset(reset: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """(batch,) int64: the tokens of the shard from its last reset on (all of them without one)."""
    if reset is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    idx = torch.arange(length, device=device)
    last = torch.where(reset, idx, -1).max(1).values
    return torch.where(last >= 0, length - last, length)


def chain_position(layer: SequenceLayer, group: dist.ProcessGroup | None) -> tuple[int, int, bool]:
    """(this rank's place in the order the state flows, group size, reversed): a ``reverse=True`` layer's state
    flows from rank P - 1 down to rank 0, so its chain position is P - 1 - rank and gathered summaries are read
    in reverse rank order."""
    rank, size = group_rank_size(group)
    rev = bool(getattr(layer, "reverse", False))
    return (size - 1 - rank if rev else rank), size, rev


def _gather(t: Tensor, group: dist.ProcessGroup | None, rev: bool, autograd: bool = False) -> Tensor:
    """All-gather (P, ...) in chain order (see :func:`chain_position`)."""
    out = all_gather_autograd(t, group) if autograd else all_gather(t, group)
    return out.flip(0) if rev else out


def cut_reverse(fields: dict[str, Tensor], reset: Tensor | None, rev: bool) -> dict[str, Tensor]:
    """A right-to-left shard that starts a segment (reset[:, 0]) passes nothing to the shard before it: its
    outgoing state is zero in those rows. Mamba and Mamba2 cut it themselves; GatedSSM, RGLRU, S4D and S4 return
    it uncut, so it is cut here for every reverse layer (idempotent)."""
    if not rev or reset is None:
        return fields
    keep = ~reset[:, 0]
    return {n: t * keep.view(-1, *([1] * (t.ndim - 1))).to(t.dtype) for n, t in fields.items()}


def _given(zero: dict[str, Tensor]) -> list[str]:
    """The fields composed from exchanged summaries rather than by the affine scan: halos and counters."""
    return [n for n in zero if n in HALO_FIELDS or (n in COUNTER_FIELDS and not zero[n].is_floating_point())]


def true_halo(layer: SequenceLayer, x: Tensor, reset: Tensor | None, zero: dict[str, Tensor],
              group: dist.ProcessGroup | None, init: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The halo (conv) and counter fields of this rank's true initial state (halos differentiable w.r.t. earlier
    ranks' inputs). ``init``: rank 0's given initial state (the state before the whole sequence), or None (zero)."""
    given = _given(zero)
    start = {n: (zero if init is None else init)[n] for n in given}
    halo_names = [n for n in given if n in HALO_FIELDS and zero[n].shape[halo_time_dim(layer, n)] > 0]
    counters = [n for n in given if n in COUNTER_FIELDS]
    if not halo_names and not counters:
        return start
    rank, _, rev = chain_position(layer, group)
    batch, length, _ = x.shape
    keep = torch.ones(batch, dtype=torch.long, device=x.device) if reset is None else (~reset.any(1)).long()
    extra = [_since_reset(reset, batch, length, x.device)] if counters else []
    meta = _gather(torch.cat([torch.tensor([length], device=x.device), keep, *extra]), group, rev)
    out = dict(start)
    for n in counters:  # tokens of the current segment: p <- p * keep_j + since_reset_j over the earlier ranks
        p = start[n] if rank == 0 else torch.zeros_like(start[n])
        for j in range(rank):
            p = p * meta[j, 1:1 + batch] + meta[j, 1 + batch:]
        out[n] = p
    if not halo_names:
        return out
    width = max(zero[n].shape[halo_time_dim(layer, n)] for n in halo_names)
    tail = min(width, length)
    piece = slice(0, tail) if rev else slice(length - tail, length)  # the tokens the state leaves through
    rt = None if reset is None else reset[:, piece]
    # rank 0 with a given initial halo: a shard shorter than the halo carries part of it into its final halo
    first = None if init is None else _build(layer.init_state(batch, dtype=zero[halo_names[0]].dtype), start)
    _, fin = _local(layer, x[:, piece], first, reset=rt, return_final_state=True)
    fin = cut_reverse(_fields(fin), rt, rev)
    for n in halo_names:
        dim = halo_time_dim(layer, n)
        gathered = _gather(fin[n], group, rev, autograd=True)  # (P, batch, channels, width)
        h = start[n] if rank == 0 else zero[n]
        for j in range(rank):
            k = meta[j, 1:1 + batch].to(h.dtype).view(batch, *([1] * (h.ndim - 1)))
            h = _shift_in(h, int(meta[j, 0]), dim) * k + gathered[j]
        # the unused slots stay in the graph, so that every rank runs the all-gather's backward (a collective)
        out[n] = h + gathered[rank:].sum() * 0
    return out


def _local(layer: SequenceLayer, *args, **kwargs):
    """The layer's own forward, bypassing the redirection :class:`~.sequence.SequenceParallel` installs."""
    return type(layer).forward(layer, *args, **kwargs)


def _scan(ms: Tensor, bs: Tensor, upto: int) -> Tensor:
    """h_0 = 0, h_{j+1} = M_j ⊙ h_j + b_j; returns h_upto. ms, bs: (P, ...)."""
    h = torch.zeros_like(bs[0])
    for j in range(upto):
        h = ms[j] * h + bs[j]
    return h


def _own(t: Tensor) -> Tensor:
    """``t`` itself if it owns its whole storage, else a compact copy (a kept view would pin its base)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _kept(ms: dict[str, Tensor], h0: dict[str, Tensor], rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """What the chunked driver keeps of a layer's summary from pass 1 for pass 2: the decays M of the later ranks
    (the backward scan needs no others) and the true initial state, except on rank 0, which is given its own. Each
    is a compact copy: M is a view of the all-gathered (P, 2, ...) buffer, which would stay alive whole otherwise
    (measured: 1.25 MiB instead of 0.25 MiB per chunk and Mamba2 layer at P = 2, 80 MiB over a 1M-token step)."""
    return ({n: _own(m[rank + 1:]) for n, m in ms.items()}, {} if rank == 0 else {n: _own(t) for n, t in h0.items()})


def _build(zero: LayerState, fields: dict[str, Tensor]) -> LayerState:
    return dataclasses.replace(zero, **fields)


class _ShardPass(torch.autograd.Function):
    """(y_r, final state fields) from (x_r, halo_r, rank 0's initial affine fields, θ): summaries, exchange,
    scan and the true pass forward; the state-gradient scan and one backward of the true pass backward (see the
    module docstring). A gradient D_r given for this rank's final state adds to G_{r+1} (and to a_r through M_r)."""

    @staticmethod
    def forward(ctx, run: dict, x: Tensor, *rest: Tensor):  # type: ignore[override]
        layer, reset, group, zero = run["layer"], run["reset"], run["group"], run["zero"]
        names, inits = run["halo_names"], run["init_names"]
        halo = dict(zip(names, rest[: len(names)], strict=False))
        given = dict(zip(inits, rest[len(names): len(names) + len(inits)], strict=False))
        rank, size, rev = chain_position(layer, group)
        affine = [n for n in _fields(zero) if n not in names]
        dense = sequence_dense.is_dense(layer)
        zf = {**_fields(zero), **{n: t.detach() for n, t in given.items()}}
        ms, h0 = {}, {}
        cache = _CACHE.get()
        slot = None if cache is None else (cache[1], id(layer))
        if cache is not None and cache[0] == "replay" and slot in cache[2]:
            ms, h0 = cache[2].pop(slot)
            if rank == 0:  # rank 0 starts from its given state: nothing kept for it
                h0 = {n: zf[n] for n in ms}
        elif affine and dense:  # S4 DPLR: a dense transition per channel (.sequence_dense)
            with torch.no_grad():
                n = affine[0]
                z = _build(zero, {n: zf[n]})  # rank 0 starts b from its given initial state
                ms[n], bs = sequence_dense.summary(layer, x, reset, z, n, SUMMARY_CHUNK, _local, cut_reverse, _gather,
                                                   rev, group)
                h0[n] = zf[n] if rank == 0 else sequence_dense.to_complex(
                    sequence_dense.scan(ms[n], sequence_dense.to_real(bs), rank))
            if cache is not None and cache[0] == "record":
                cache[2][slot] = _kept(ms, h0, rank)
        elif affine:  # M and b from one batched no-grad pass: rows [0, B) start at h, rows [B, 2B) at h + 1
            with torch.no_grad():
                two = {n: torch.cat([halo[n], halo[n]]) for n in names}
                two.update({n: torch.cat([zf[n], zf[n] + 1]) for n in affine})
                state = _build(run["zero2"], two)
                starts = range(0, x.shape[1], SUMMARY_CHUNK)  # time chunks (its memory stays bounded), in the
                for a in (reversed(starts) if rev else starts):  # order the state flows
                    xc = x[:, a:a + SUMMARY_CHUNK]
                    rc = None if reset is None else torch.cat([reset[:, a:a + SUMMARY_CHUNK]] * 2)
                    _, state = _local(layer, torch.cat([xc, xc]), state, reset=rc, return_final_state=True)
                    state = _build(state, cut_reverse(_fields(state), rc, rev))
                fin = _fields(state)
                for n in affine:
                    b, one = fin[n].chunk(2)
                    both = _gather(torch.stack([one - b, b]), group, rev)  # (P, 2, batch, ...)
                    ms[n] = both[:, 0]
                    h0[n] = zf[n] if rank == 0 else _scan(both[:, 0], both[:, 1], rank)
                del state, fin, two
            trim_heap()
            if cache is not None and cache[0] == "record":
                cache[2][slot] = _kept(ms, h0, rank)
        if ms and next(iter(ms.values())).shape[0] < size:  # replayed: M of ranks > rank, re-indexed
            ms = {n: torch.cat([m.new_zeros((rank + 1, *m.shape[1:])), m]) for n, m in ms.items()}
        ctx.run, ctx.rank, ctx.size, ctx.ms, ctx.affine, ctx.rev = run, rank, size, ms, affine, rev
        ctx.dense = dense
        want = run["want_state"]
        if not run["need_grad"]:
            with torch.no_grad():
                y, fin = _local(layer, x, _build(zero, {**halo, **h0}), reset=reset, return_final_state=True)
            return (y, *cut_reverse(_fields(fin), reset, rev).values()) if want else y
        saved: set[int] = set()  # storages the inner graph saved for its backward

        def pack(t: Tensor) -> Tensor:
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xd = x.detach().requires_grad_(x.requires_grad)
            hd = {n: t.detach().requires_grad_(t.requires_grad) for n, t in halo.items()}
            h0d = {n: t.detach().requires_grad_() for n, t in h0.items()}
            y, fin = _local(layer, xd, _build(zero, {**hd, **h0d}), reset=reset, return_final_state=True)
            fin = cut_reverse(_fields(fin), reset, rev)
        ctx.inner = (y, fin, xd, hd, h0d)
        out = _release_output(y, saved | {t.untyped_storage().data_ptr() for t in (x, *fin.values())})
        return (out, *[t.detach() for t in fin.values()]) if want else out

    @staticmethod
    def backward(ctx, gy: Tensor, *gfin: Tensor):  # type: ignore[override]
        y, fin, xd, hd, h0d = ctx.inner
        del ctx.inner
        run, rank, size, affine = ctx.run, ctx.rank, ctx.size, ctx.affine
        direct = dict(zip(fin, gfin, strict=False))  # the caller's gradients of the returned final state
        outs, grads = [y], [gy]
        for n, g in direct.items():
            if n not in affine and g is not None:
                outs.append(fin[n])
                grads.append(g)
        leaves = [h0d[n] for n in affine]
        pruned_outs = outs + [fin[n] for n in affine if direct.get(n) is not None]
        pruned_grads = grads + [direct[n] for n in affine if direct.get(n) is not None]
        # a_r enters G_j of the ranks before r only, so the chain's first rank needs no pruned backward (it gathers
        # zeros): that saves it one backward pass per layer and the memory of the retained graph's gradients
        local = torch.autograd.grad(pruned_outs, leaves, pruned_grads, retain_graph=True,
                                    allow_unused=True) if leaves and rank > 0 else [None] * len(leaves)
        for n, leaf, a in zip(affine, leaves, local, strict=False):
            a = torch.zeros_like(leaf) if a is None else a
            gathered = _gather(a, run["group"], ctx.rev)  # (P, batch, ...), chain order
            g = torch.zeros_like(a)
            for j in range(size - 1, rank, -1):  # G_j = a_j + conj(M_j) G_{j+1}, down to G_{rank+1}
                g = gathered[j] + (sequence_dense.adjoint(ctx.ms[n][j], g) if ctx.dense else ctx.ms[n][j].conj() * g)
            if direct.get(n) is not None:
                g = g + direct[n]
            if (rank < size - 1 or direct.get(n) is not None) and fin[n].requires_grad:
                outs.append(fin[n])
                grads.append(g)
        params = run["params"]
        wrt = [xd] + [hd[n] for n in run["halo_names"]] + [h0d[n] for n in run["init_names"]] + params
        need = [t.requires_grad for t in wrt]
        wanted = [t for t, k in zip(wrt, need, strict=True) if k]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        res = [next(got) if k else None for k in need]
        return (None, *res)


def _release_output(y: Tensor, keep: set[int]) -> Tensor:
    """A copy of ``y`` for the caller, and ``y``'s own storage freed, when nothing of the inner graph saved it
    (``keep``: the storages it saved, the input's and the final state's). The inner graph holds ``y`` until the
    backward only as the root it starts from (its shape and ``grad_fn``); without this the layer's output would
    stay resident from the forward to the backward, which a plain layer's output does not (the residual add that
    takes it saves nothing): 16 MiB per Mamba layer (d_model 256) and 16,384 positions. Only with the heap bounded
    (:func:`.heap.bound_heap`, which the chunked driver calls): in glibc's brk heap the copy and the freed block
    fragment it, and the peak RSS of a chunked step rose instead (792 -> 891 MiB, one process, the 2-layer Mamba LM
    at 16,384 positions)."""
    ptr = y.untyped_storage().data_ptr()
    if (ptr in keep or y._base is not None or y.grad_fn is None or not y.is_contiguous()
            or not heap_bounded()):
        return y.detach()
    out = y.detach().clone()
    y.untyped_storage().resize_(0)
    return out


def recurrent_forward(layer: SequenceLayer, x: Tensor, reset: Tensor | None, group: dist.ProcessGroup | None,
                      initial_state: LayerState | None = None, return_final_state: bool = False):
    """The local shard of the one-process ``layer(x_full, initial_state, reset=reset_full,
    return_final_state=...)``: x (batch, L_r, d_model) -> y, or (y, the true state after this rank's shard).
    ``initial_state`` (the state before the whole sequence) is given on the group's rank 0 only."""
    rank, _ = group_rank_size(group)
    if getattr(layer, "reverse", False) and (initial_state is not None or return_final_state):
        raise NotImplementedError(f"sequence parallel: {type(layer).__name__} with reverse=True does not pass "
                                  f"state across calls (its state flows right to left, against chunked training)")
    batch = x.shape[0]
    dtype = layer.act_dtype(x)
    zero = layer.init_state(batch, dtype=dtype)
    zf = _fields(zero)
    init = None
    if initial_state is not None:
        if rank != 0:
            raise ValueError(f"sequence parallel: {type(layer).__name__} got an initial_state on rank {rank}; "
                             f"only rank 0 of the group takes one (later ranks start from the earlier shards)")
        init = _fields(layer.check_state(initial_state, batch))
    if isinstance(layer, Mamba3):  # angle, k, x exchanged exactly (.sequence_mamba3); h affine given them
        halo = sequence_mamba3.given_fields(layer, x, reset, zf, group, init, _local)
        names = list(sequence_mamba3.GIVEN)
    else:
        halo = true_halo(layer, x, reset, zf, group, init)
        names = _given(zf)
    inits = [] if init is None else [n for n in zf if n not in names]
    params = [p for p in layer.parameters() if p.requires_grad]
    need_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params)
                                             or any(halo[n].requires_grad for n in names)
                                             or any(init[n].requires_grad for n in inits))
    run = {"layer": layer, "reset": reset, "group": group, "zero": zero, "halo_names": names,
           "init_names": inits, "zero2": layer.init_state(2 * batch, dtype=dtype), "params": params,
           "need_grad": need_grad, "want_state": return_final_state}
    out = _ShardPass.apply(run, x, *[halo[n] for n in names], *[init[n] for n in inits], *params)
    if not return_final_state:
        return out
    return out[0], _build(zero, dict(zip(zf, out[1:], strict=True)))

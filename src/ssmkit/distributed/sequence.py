"""Exact sequence (context) parallelism: one sequence split into P contiguous shards on the P ranks of a group.

    x_local = shard_sequence(x, group)          # (batch, L, ...) -> (batch, L_r, ...), rank r's piece
    sp = SequenceParallel(model_or_layer, group)
    y_local = sp(x_local, reset=shard_sequence(reset, group))   # the local piece of the one-process output
    y = gather_sequence(y_local, group)         # the whole output on every rank (differentiable)

Shards are contiguous and as even as possible (the first L mod P ranks get one token more). Every supported
layer gives exactly the one-process outputs and gradients of its shard: recurrent layers with a diagonal state and
short or long convolutions (Mamba, Mamba2, S4D, GatedSSM, RGLRU, H3, LongConv, S4 ptd, S6, H3S6, MambaS4D,
NormedMamba, Griffin: :mod:`.sequence_recurrent`), S4 with its DPLR state (a dense transition: :mod:`.sequence_dense`),
the same layers with ``reverse=True`` (summaries flow from rank P - 1 down) and the wrappers built of them
(Bidirectional, PrefixBidirectional), causal / sliding-window / prefix-masked attention and GQA / local GQA (ring
attention: :mod:`.ring_attention`, :mod:`.ring_prefix`), per-token layers (FeedForward, MoE) and the hybrid blocks
that combine them per position (FalconH1's ParallelHybrid, Zamba2Hybrid), and Mamba3 (:mod:`.sequence_mamba3`).
Per-token modules (embeddings, norms, MLPs, heads) need nothing. See docs/distributed.md, "Sequence parallel".

Weight gradients: each rank holds the gradient of its own shard's share of the loss, so the gradients of a
parameter must be summed over the sequence-parallel group (DDP over the whole world does this, up to its
averaging: scale the local loss so that the group's per-rank losses add up to the one-process loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.ablation import H3S6, S6, MambaS4D
from ..layers.attention import Attention
from ..layers.base import SequenceLayer, rename_state_kwargs
from ..layers.bidirectional import Bidirectional, PrefixBidirectional, check_prefix_mask
from ..layers.falcon_h1 import ParallelHybrid
from ..layers.ffn import PositionwiseLayer
from ..layers.gated import RGLRU, GatedSSM
from ..layers.gqa import GQAttention
from ..layers.griffin import GriffinRecurrent
from ..layers.h3 import H3
from ..layers.longconv import LongConv
from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2
from ..layers.mamba3 import Mamba3
from ..layers.s4 import S4
from ..layers.s4d import S4D
from ..layers.zamba2_shared import Zamba2Hybrid
from .ring_attention import ring_attention_forward
from .sequence_comm import all_gather, all_gather_autograd, group_rank_size
from .sequence_recurrent import recurrent_forward

#: recurrent layers (subclasses included: NormedMamba, FalconH1's Mamba-2): :mod:`.sequence_recurrent`
RECURRENT = (Mamba, Mamba2, Mamba3, S4D, GatedSSM, RGLRU, H3, LongConv, S4, S6, H3S6, MambaS4D, GriffinRecurrent)
#: attention layers: ring attention (:mod:`.ring_attention`); LocalGQAttention and Zamba2's shared attention are
#: GQAttention subclasses
ATTENTION = (Attention, GQAttention)
#: layers mapping each position on its own (FeedForward, MoE): they run on the shard unchanged
POSITIONWISE = (PositionwiseLayer,)
#: layers that only combine other sequence layers per position (FalconH1's parallel block, Zamba2's hybrid
#: layer): the sequence layers inside them are redirected, they themselves run unchanged
COMPOSITE = (ParallelHybrid, Zamba2Hybrid)
#: wrappers of a left-to-right and a reverse=True layer (Bidirectional, PrefixBidirectional): the halves are
#: redirected (a reverse layer's summaries flow from rank P - 1 down), the wrapper runs unchanged
WRAPPERS = (Bidirectional, PrefixBidirectional)
SUPPORTED = (*RECURRENT, *ATTENTION, *POSITIONWISE, *COMPOSITE, *WRAPPERS)
#: set while a composite layer runs: it asks its attention for a KV cache that it then drops
_DROP_CACHE: ContextVar[bool] = ContextVar("sp_drop_cache", default=False)


def shard_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``parts`` contiguous shards of ``length`` tokens; sizes differ by at most one."""
    if length < parts:
        raise ValueError(f"shard_sequence: the sequence has {length} tokens, fewer than the {parts} ranks of the "
                         f"sequence-parallel group; every rank needs at least one token")
    base, extra = divmod(length, parts)
    sizes = [base + (i < extra) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=False)]


def shard_sequence(x: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1) -> Tensor:
    """This rank's contiguous piece of ``x`` along ``dim`` (default 1, the time axis of (batch, length, ...))."""
    if not isinstance(x, Tensor) or x.ndim <= dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"shard_sequence: x must be a tensor with a dimension {dim} (time), got {got}")
    rank, size = group_rank_size(group)
    start, end = shard_bounds(x.shape[dim], size)[rank]
    return x.narrow(dim, start, end - start)


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1) -> Tensor:
    """Inverse of :func:`shard_sequence` on every rank (differentiable): the pieces of all ranks, in rank order,
    concatenated along ``dim``. Pieces may differ in length along ``dim`` only."""
    if not isinstance(x, Tensor) or x.ndim <= dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"gather_sequence: x must be a tensor with a dimension {dim} (time), got {got}")
    lengths = all_gather(torch.tensor([x.shape[dim]], device=x.device), group)[:, 0].tolist()
    most = max(lengths)
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, most - x.shape[dim]]
    padded = torch.nn.functional.pad(x, pad) if most > x.shape[dim] else x
    pieces = all_gather_autograd(padded, group).unbind(0)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, lengths, strict=False)], dim=dim)


def check_supported(layer: nn.Module) -> None:
    """NotImplementedError (one line) unless ``layer`` has an exact sequence-parallel form here."""
    name = type(layer).__name__
    if isinstance(layer, Mamba3) and layer.reverse:
        raise NotImplementedError(f"sequence parallel: {name} with reverse=True is not supported")
    if not isinstance(layer, SUPPORTED):
        raise NotImplementedError(f"sequence parallel: {name} is not supported yet (supported: "
                                  f"{', '.join(c.__name__ for c in SUPPORTED)} and their subclasses)")


def layer_forward(layer: SequenceLayer, x: Tensor, initial_state=None, *, reset: Tensor | None = None,
                  group: dist.ProcessGroup | None = None, return_final_state: bool = False,
                  prefix_mask: Tensor | None = None):
    """The local shard of ``layer(x_full, initial_state, reset=reset_full, return_final_state=...)`` for this
    rank's shard ``x`` (batch, L_r, d_model) and ``reset`` (batch, L_r) bool or None. ``initial_state`` (the state
    before the whole sequence) is given on rank 0 only; the returned state is the true state after this rank's
    shard (recurrent layers only). ``prefix_mask``: this rank's piece (Attention with mask="prefix" only; its
    boundaries are checked by :func:`check_prefix_across`). Collective: every rank of ``group`` must call it."""
    check_supported(layer)
    x = layer.check_input(x)
    layer.check_dtype(x, "x")
    reset = layer.check_reset(reset, x)
    if prefix_mask is not None:
        if not (isinstance(layer, Attention) and layer.mask == "prefix"):
            raise ValueError(f"{type(layer).__name__}: prefix_mask is only accepted by Attention with mask='prefix'")
        check_prefix_mask(type(layer).__name__, prefix_mask, x, reset, False)  # within the shard
    meta = all_gather(torch.tensor([x.shape[0], initial_state is not None], device=x.device), group)
    batches = meta[:, 0].tolist()
    if len(set(batches)) > 1:
        raise ValueError(f"sequence parallel: every rank must hold the same batch rows (shards of the same "
                         f"sequences), got batch sizes {batches} across the group")
    late = [r for r, k in enumerate(meta[:, 1].tolist()) if k and r > 0]
    if late:  # checked on every rank, before any other collective, so that no rank is left waiting
        raise ValueError(f"sequence parallel: {type(layer).__name__} got an initial_state on rank(s) {late}; only "
                         f"rank 0 of the group takes one (later ranks start from the earlier shards' true state)")
    if isinstance(layer, POSITIONWISE):
        return type(layer).forward(layer, x, initial_state, reset=reset, return_final_state=return_final_state)
    if isinstance(layer, ATTENTION):
        if initial_state is not None or (return_final_state and not _DROP_CACHE.get()):
            raise NotImplementedError(f"sequence parallel: {type(layer).__name__} does not pass state (its KV "
                                      f"cache) across calls; state passing (chunked training) needs recurrent layers")
        y = ring_attention_forward(layer, x, reset, group, prefix_mask)
        return (y, None) if return_final_state else y  # None: the composite around it drops the cache
    return recurrent_forward(layer, x, reset, group, initial_state, return_final_state)


class SequenceParallel(nn.Module):
    """Runs ``module`` (a supported layer, or a model such as CausalLM whose mixers are supported layers) on this
    rank's shard: every top-level sequence layer inside it computes its exact distributed form, everything else
    runs per token as usual. ``forward(*args, **kwargs)`` is ``module``'s forward on local shards (inputs,
    ``reset``, ``labels``, ... all sharded with :func:`shard_sequence`) and returns its local outputs.

    The module itself is not changed (its parameters and state_dict keys stay the same): the layers' forwards are
    redirected only while ``forward`` runs. State passing (recurrent layers): ``initial_state``, the state before
    the whole sequence, is given on the group's rank 0 only (None elsewhere), and ``return_final_state`` returns on
    every rank the true state after its own shard (rank P - 1: after the whole sequence); chunked training uses
    this (:mod:`.sequence_chunked`). ``prefix_mask`` (PrefixLM) is sharded like ``reset``; a prefix may span
    several ranks (checked across the group: a prefix token opening a shard must continue the previous shard's
    prefix or start a segment).
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.module, self.group = module, group
        self.layers = _top_layers(module)
        if not self.layers:
            raise ValueError(f"SequenceParallel: {type(module).__name__} contains no sequence layers")
        for layer in self.layers:
            check_supported(layer)

    def forward(self, *args, **kwargs):
        rename_state_kwargs(f"{type(self).__name__}.forward", kwargs)
        if kwargs.get("prefix_mask") is not None:
            check_prefix_across(kwargs["prefix_mask"], kwargs.get("reset"), self.group)
        with _redirected(self.layers, self.group):
            return self.module(*args, **kwargs)


def check_prefix_across(prefix_mask: object, reset: object, group: dist.ProcessGroup | None) -> None:
    """ValueError (one line, on every rank) unless the local prefix masks form a valid global one at the shard
    boundaries: a prefix token at a shard's first position (rank > 0) needs a reset there or a prefix token at
    the previous shard's last position. Within a shard the layers check it themselves."""
    if not isinstance(prefix_mask, Tensor) or prefix_mask.dtype != torch.bool or prefix_mask.ndim != 2:
        got = f"{tuple(prefix_mask.shape)} {prefix_mask.dtype}" if isinstance(prefix_mask, Tensor) else \
            type(prefix_mask).__name__
        raise ValueError(f"SequenceParallel: prefix_mask must be a bool tensor (batch, L_r), got {got}")
    first_reset = reset[:, 0] if isinstance(reset, Tensor) and reset.ndim == 2 and reset.shape[1] else \
        torch.zeros_like(prefix_mask[:, 0])
    flags = torch.stack([prefix_mask[:, 0], prefix_mask[:, -1], first_reset.to(torch.bool)]).long()
    every = all_gather(flags, group)  # (P, 3, batch)
    for r in range(1, every.shape[0]):
        bad = (every[r, 0] == 1) & (every[r, 2] == 0) & (every[r - 1, 1] == 0)
        if bool(bad.any()):
            raise ValueError(f"SequenceParallel: prefix_mask row {int(bad.nonzero()[0])} has a prefix token at "
                             f"rank {r}'s first position that neither starts a segment nor follows a prefix token; "
                             f"a prefix must be contiguous at the start of its segment")


def _top_layers(module: nn.Module) -> list[SequenceLayer]:
    """Sequence layers in ``module`` not nested inside another sequence layer (``module`` itself if it is one)."""
    if isinstance(module, (*COMPOSITE, *WRAPPERS)):
        return [module] + [m for child in module.children() for m in _top_layers(child)]
    if isinstance(module, SequenceLayer):
        return [module]
    out: list[SequenceLayer] = []
    for child in module.children():
        out += _top_layers(child)
    return out


@contextmanager
def _redirected(layers: list[SequenceLayer], group: dist.ProcessGroup | None) -> Iterator[None]:
    def make(layer: SequenceLayer):
        def forward(x, initial_state=None, *, reset=None, prefix_mask=None, return_final_state=False):
            return layer_forward(layer, x, initial_state, reset=reset, group=group,
                                 return_final_state=return_final_state, prefix_mask=prefix_mask)
        return forward

    def make_composite(layer: SequenceLayer):
        def forward(x, initial_state=None, *, reset=None, return_final_state=False, **kwargs):
            if initial_state is not None or return_final_state:
                raise NotImplementedError(f"sequence parallel: {type(layer).__name__} holds attention, which does "
                                          f"not pass state (its KV cache) across calls")
            token = _DROP_CACHE.set(True)
            try:
                return type(layer).forward(layer, x, reset=reset, **kwargs)
            finally:
                _DROP_CACHE.reset(token)
        return forward

    for layer in layers:
        if isinstance(layer, COMPOSITE):
            layer.forward = make_composite(layer)
        elif not isinstance(layer, WRAPPERS):  # a wrapper's own forward runs; its halves are redirected
            layer.forward = make(layer)
    try:
        yield
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward

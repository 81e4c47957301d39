"""Bidirectional wrappers: a plain forward+reverse pair, and Birdie's prefix-bidirectional layer.

Both build on layers that take ``reverse: bool`` in their constructor (GatedSSM, RGLRU, Mamba, S4D) and read
``self.reverse`` when they run.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import torch
from torch import Tensor, nn

from .base import LayerState, SequenceLayer, check_choice, check_d_model, state_kwargs

#: The layers with a ``reverse`` flag that the wrappers are known to work with.
REVERSIBLE = ("GatedSSM", "RGLRU", "Mamba", "S4D")


def check_prefix_mask(
    owner: str, prefix_mask: object, x: Tensor, reset: Tensor | None, has_state: bool
) -> Tensor | None:
    """Validate a prefix mask: bool (batch, length), True on prefix tokens.

    A prefix is contiguous at the start of its segment: a prefix token is either a segment start (position 0
    without a state, or a ``reset`` position) or follows another prefix token. In particular, when a state is
    given, the tokens that continue the state's segment must be suffix tokens.
    """
    if prefix_mask is None:
        return None
    shape = (x.shape[0], x.shape[1])
    if (
        not isinstance(prefix_mask, Tensor)
        or prefix_mask.dtype != torch.bool
        or tuple(prefix_mask.shape) != shape
    ):
        got = (
            f"{tuple(prefix_mask.shape)} {prefix_mask.dtype}"
            if isinstance(prefix_mask, Tensor)
            else type(prefix_mask).__name__
        )
        raise ValueError(
            f"{owner}: prefix_mask must be a bool tensor of shape (batch, length) = {shape}, got {got}"
        )
    if prefix_mask.device != x.device:
        raise ValueError(f"{owner}: prefix_mask is on {prefix_mask.device} but x is on {x.device}")
    starts = torch.zeros_like(prefix_mask) if reset is None else reset.clone()
    if not has_state:
        starts[:, 0] = True
    allowed = starts.clone()
    allowed[:, 1:] |= prefix_mask[:, :-1]
    bad = prefix_mask & ~allowed
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        why = (
            "a forward call with a state continues the state's segment causally, so its tokens before the "
            "first reset must be suffix tokens"
            if has_state and not bool(starts[b, : t + 1].any())
            else "a prefix must be contiguous at the start of its segment"
        )
        raise ValueError(
            f"{owner}: prefix_mask[{b}, {t}] is True but position {t} is neither a segment start nor "
            f"preceded by a prefix token: {why}"
        )
    return prefix_mask


def _set_reverse(layer: nn.Module) -> None:
    """Set every ``reverse`` flag in ``layer`` (the layer's own and any submodule's) to True."""
    for m in layer.modules():
        if isinstance(getattr(m, "reverse", None), bool):
            m.reverse = True


def _check_reversible(owner: str, layer: object) -> SequenceLayer:
    if not isinstance(layer, SequenceLayer):
        raise TypeError(
            f"{owner}: layer must be an ssmkit SequenceLayer (one of {', '.join(REVERSIBLE)}), "
            f"got {type(layer).__name__}"
        )
    if not isinstance(getattr(layer, "reverse", None), bool):
        raise TypeError(
            f"{owner}: layer must support reverse=True (a bool `reverse` attribute read at run time), "
            f"as {', '.join(REVERSIBLE)} do; {type(layer).__name__} does not"
        )
    if layer.reverse:
        raise ValueError(
            f"{owner}: layer must be a left-to-right layer (reverse=False); the wrapper makes the "
            f"reverse copy itself"
        )
    return layer


class Bidirectional(SequenceLayer):
    """A forward copy and a reverse copy of a layer, summed or concatenated and projected back to d_model.

    The reverse copy is a deep copy of ``layer`` (so both start from the same weights) with every ``reverse``
    flag in it set to True. The layer must be left-to-right and support ``reverse`` (GatedSSM, RGLRU, Mamba,
    S4D). ``reset`` is passed to both copies, so packed segments stay independent in both directions.

    Each output depends on the whole segment, so there is no recurrent ``step`` and no state to pass:
    ``step``/``init_state`` raise NotImplementedError; an initial_state or ``return_final_state=True`` raises
    ValueError.

    Args:
        layer: the left-to-right layer to wrap.
        combine: "sum" (y_fwd + y_rev) or "concat" (Linear(2 d_model -> d_model) of [y_fwd, y_rev]).

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    can_step = False

    def __init__(self, layer: SequenceLayer, combine: str = "sum") -> None:
        super().__init__()
        name = type(self).__name__
        layer = _check_reversible(name, layer)
        self.combine = check_choice(name, "combine", combine, ("sum", "concat"))
        self.d_model = layer.d_model
        self.fwd = layer
        self.bwd = copy.deepcopy(layer)
        _set_reverse(self.bwd)
        p = next(layer.parameters(), None)
        kw = {} if p is None else {"device": p.device, "dtype": p.dtype}
        self.proj = nn.Linear(2 * self.d_model, self.d_model, **kw) if self.combine == "concat" else None

    def step_unsupported_reason(self) -> str:
        return (
            "a bidirectional layer's output at position t depends on the tokens after t, so it has no "
            "left-to-right recurrence; run forward over the whole sequence (or use PrefixBidirectional, "
            "which steps causally after its prefix)"
        )

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> LayerState:
        raise NotImplementedError(f"{type(self).__name__} has no state: {self.step_unsupported_reason()}")

    @state_kwargs
    def forward(
        self, x: Tensor, initial_state: None = None, *, reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model). ``reset`` marks segment starts."""
        name = type(self).__name__
        if initial_state is not None or return_final_state:
            raise ValueError(
                f"{name}: state passing is undefined for a bidirectional layer (initial_state must be None "
                f"and return_final_state False): {self.step_unsupported_reason()}"
            )
        x = self.check_input(x)
        reset = self.check_reset(reset, x)
        y_f = self.fwd(x, reset=reset)
        y_b = self.bwd(x, reset=reset)
        return y_f + y_b if self.proj is None else self.proj(torch.cat([y_f, y_b], dim=-1))


def _default(cls: type, name: str, d_model: int) -> object:
    """The default of constructor argument ``name`` of ``cls`` (None means d_model for d_state)."""
    param = inspect.signature(cls).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        raise TypeError(f"PrefixBidirectional: {cls.__name__} has no default for {name!r}")
    return d_model if param.default is None else param.default


def _split_width(
    owner: str, cls: type, width: str, unit: int, d_model: int, kwargs: dict
) -> tuple[dict, dict]:
    """Constructor arguments (causal, reverse) splitting ``cls``'s state width in halves that sum to one plain
    layer's: ``d_state`` in ceil/floor halves of ``unit``-sized groups (S4D keeps conjugate pairs whole), or
    Mamba's inner width d_inner = expand * d_model halved."""
    total = kwargs.pop(width, None)
    total = _default(cls, width, d_model) if total is None else total
    if width == "expand":
        ok = not isinstance(total, bool) and isinstance(total, (int, float)) and total > 0
        d_inner = total * d_model if ok else None
        if d_inner is None or d_inner != int(d_inner) or int(d_inner) < 2 or int(d_inner) % 2:
            raise ValueError(
                f"{owner}: expand * d_model must be an even integer >= 2 so that the inner width can be "
                f"split in half, got expand={total!r}, d_model={d_model}"
            )
        return {"expand": total / 2}, {"expand": total / 2}
    if isinstance(total, bool) or not isinstance(total, int) or total < 2 * unit or total % unit:
        need = "an int >= 2" if unit == 1 else f"a multiple of {unit} >= {2 * unit}"
        raise ValueError(f"{owner}: {width} must be {need} so that it can be split in half, got {total!r}")
    groups = total // unit
    return {width: unit * (groups - groups // 2)}, {width: unit * (groups // 2)}


# kind -> (module, class, constructor argument whose width is split in half, its granularity)
_KINDS = {
    "gated": ("gated", "GatedSSM", "d_state", 1),
    "rglru": ("gated", "RGLRU", "d_state", 1),
    "mamba": ("mamba", "Mamba", "expand", 1),
    "s4d": ("s4d", "S4D", "d_state", 2),
}


class PrefixBidirectional(SequenceLayer):
    """Birdie's prefix-bidirectional layer: causal over the suffix, bidirectional over a prefix.

    The state channels are split in half, so the total state size equals one plain layer's: ``d_state`` for
    gated/rglru/s4d (the causal half gets ceil(n/2), the reverse half floor(n/2), counted in conjugate pairs
    for s4d); the inner width ``expand * d_model`` for mamba (each half gets expand/2, which also halves the
    conv state):
      * the causal half, a left-to-right layer, scans everything;
      * the reverse half, the same kind of layer with ``reverse=True``, scans right to left with its decay
        forced to 0 at every suffix position. This is done by passing it ``reset | ~prefix_mask`` as segment
        starts: no state flows right-to-left out of a suffix position, so a suffix position's reverse output
        depends on that token alone and prefix positions see only their segment's prefix. Nothing from the
        future reaches any suffix position.
    The two outputs are concatenated and projected back to d_model.

    ``prefix_mask`` (batch, length) bool is True on prefix tokens; a prefix is contiguous at the start of each
    segment (position 0, or a ``reset`` position). No ``prefix_mask`` means all suffix: a fully causal layer.

    State passing and ``step`` continue causally after the prefix. The state is the causal half's state; the
    reverse half at a suffix position depends only on the current token, so ``step`` computes it as a fresh
    one-token run. A forward call with a state must be all suffix up to its first reset (a ValueError
    otherwise): the prefix is only known in a call that sees all of it.

    Args:
        d_model: model width.
        kind: "gated" (GatedSSM), "rglru" (RGLRU), "mamba" (Mamba) or "s4d" (S4D).
        **layer_kwargs: passed to both halves' constructors; ``d_state`` (``expand`` for mamba) is the total,
            split in half.

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(self, d_model: int, kind: str = "gated", **layer_kwargs) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.kind = check_choice(name, "kind", kind, tuple(_KINDS))
        if "reverse" in layer_kwargs:
            raise ValueError(f"{name}: do not pass reverse; the layer builds one half of each direction")
        module, cls_name, width, unit = _KINDS[kind]
        cls = getattr(importlib.import_module(f".{module}", __package__), cls_name)
        kw_causal, kw_rev = _split_width(name, cls, width, unit, d_model, dict(layer_kwargs))
        rest = {k: v for k, v in layer_kwargs.items() if k != width}
        self.causal = cls(d_model, **kw_causal, **rest)
        self.rev = cls(d_model, reverse=True, **kw_rev, **rest)
        p = next(self.causal.parameters())
        self.out_proj = nn.Linear(2 * d_model, d_model, device=p.device, dtype=p.dtype)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> LayerState:
        """The causal half's zero state."""
        return self.causal.init_state(batch_size, dtype=dtype)

    @state_kwargs
    def forward(
        self,
        x: Tensor,
        initial_state: LayerState | None = None,
        *,
        prefix_mask: Tensor | None = None,
        reset: Tensor | None = None,
        return_final_state: bool = False,
    ):
        """x: (batch, length, d_model) -> y (batch, length, d_model), or (y, final state) if
        ``return_final_state``.

        prefix_mask: (batch, length) bool, True on prefix tokens; None = all suffix (causal).
        reset: (batch, length) bool segment starts.
        """
        name = type(self).__name__
        x = self.check_input(x)
        reset = self.check_reset(reset, x)
        if initial_state is not None:
            self.check_state(initial_state, x.shape[0])
        prefix_mask = check_prefix_mask(name, prefix_mask, x, reset, initial_state is not None)
        y_c, new_state = self.causal(x, initial_state, reset=reset, return_final_state=True)
        starts = torch.ones_like(x[..., 0], dtype=torch.bool) if prefix_mask is None else ~prefix_mask
        if reset is not None:
            starts = starts | reset
        y_r = self.rev(x, reset=starts)
        y = self.out_proj(torch.cat([y_c, y_r], dim=-1))
        return (y, new_state) if return_final_state else y

    def step(self, x_t: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One suffix token x_t: (batch, d_model) -> (y_t, new state)."""
        x_t = self.check_step_input(x_t)
        self.check_state(state, x_t.shape[0])
        y_c, state = self.causal.step(x_t, state)
        y_r = self.rev(x_t.unsqueeze(1)).squeeze(1)
        return self.out_proj(torch.cat([y_c, y_r], dim=-1)), state

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, kind={self.kind!r}"

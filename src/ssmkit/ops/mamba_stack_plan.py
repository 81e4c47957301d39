"""A stack of Mamba blocks prepared for the fused decode kernel (:class:`MambaStackPlan`, built once and reused
per token) and one token through it (:func:`mamba_stack_step`); :class:`WeightsKey` tells when a plan is stale."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .linear_scan import use_fused
from .mamba_step_torch import _torch_step, stack_by_blocks
from .mamba_step_weights import MambaStepWeights, _cols, check_stack_extras, check_step_args
from .threads import kernel_threads


class WeightsKey:
    """What a plan built from ``tensors`` depends on, cheap to check per token: each tensor's storage address (a
    ``.data`` swap or a dtype/device move changes it) and the version counter of each tensor that was not
    contiguous when the plan was built. The plan copies those, so their in-place updates (which bump the counter)
    must rebuild it; in-place updates of contiguous tensors reach the plan's views by themselves. ``copied_too``:
    tensors of the list that the plan copies although they are contiguous (e.g. stacked or concatenated)."""

    __slots__ = ("copied", "ptrs")

    def __init__(self, tensors: list[Tensor], copied_too: list[Tensor] = ()) -> None:
        self.ptrs = tuple(t.data_ptr() for t in tensors)
        extra = {id(t) for t in copied_too}
        self.copied = tuple((i, t._version) for i, t in enumerate(tensors)
                            if not t.is_contiguous() or id(t) in extra)

    def matches(self, tensors: list[Tensor]) -> bool:
        """Whether a plan built with this key is still valid for ``tensors`` (the same list, in the same order)."""
        return (tuple(t.data_ptr() for t in tensors) == self.ptrs
                and all(tensors[i]._version == v for i, v in self.copied))


def _np(t: Tensor | None, like: Tensor):
    """A contiguous numpy view (a length-0 array for a missing bias or scale)."""
    if t is None:
        return like.new_empty(0).numpy()
    return t.detach().contiguous().numpy()


_LAYER_FIELDS = ("in_w", "in_scale", "in_b", "conv_w", "conv_b", "x_w", "x_scale", "dt_w", "dt_b", "a_log", "d",
                 "out_w", "out_scale", "out_b")


class MambaStackPlan:
    """A stack of Mamba blocks (h <- h + mamba_l(rmsnorm_l(h)), then a final RMSNorm) prepared for
    :func:`mamba_stack_step`: the weights as numpy views, built once and reused for every token.

    layers: one MambaStepWeights per block, all with the same shapes and dtypes; norm_weights: the blocks'
    RMSNorm weights (d_model,), or None for a bare mixer; final_weight: the final RMSNorm weight or None;
    head: an optional output layer (weight (V, d_model) float or int8, per-row scale or None, bias or None)
    run in the same launch (an LM head). norm_eps / final_eps: the epsilons of the block norms and the final norm.
    act_quant: the int8 / int4 weights (and head) multiply activations quantized per block of 32
    (:mod:`ssmkit.ops.q8_act`; float weights ignore it). ``key`` (a :class:`WeightsKey`) tells whether the
    plan is still valid for the weights (:meth:`stale`).
    """

    def __init__(self, layers: list[MambaStepWeights], norm_weights: list[Tensor] | None = None,
                 final_weight: Tensor | None = None, *, norm_eps: float = 1e-5, final_eps: float = 1e-5,
                 residual: bool = True, head: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
                 act_quant: bool = False) -> None:
        if not layers:
            raise ValueError("MambaStackPlan: layers is empty")
        if not isinstance(act_quant, bool):
            raise ValueError(f"MambaStackPlan: act_quant must be a bool, got {act_quant!r}")
        self.act_quant = act_quant
        first = layers[0]
        like = first.d
        for i, w in enumerate(layers):
            for name in _LAYER_FIELDS:
                a, b = getattr(w, name), getattr(first, name)
                if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or a.dtype != b.dtype)):
                    raise ValueError(f"MambaStackPlan: layers[{i}].{name} differs in shape or dtype from "
                                     f"layers[0].{name}")
        d_model = _cols(first.in_w, first.in_scale)
        check_stack_extras("MambaStackPlan", len(layers), d_model, norm_weights, final_weight, head)
        self.layers, self.residual, self.head = list(layers), residual, head
        self.norm_weights = None if norm_weights is None else list(norm_weights)
        self.eps, self.final_weight, self.final_eps = norm_eps, final_weight, final_eps
        tensors = [t for w in layers for t in w if t is not None] + list(norm_weights or [])
        tensors += ([final_weight] if final_weight is not None else []) + [t for t in (head or ()) if t is not None]
        self.key = WeightsKey(tensors, copied_too=[w.a_log for w in layers])  # the kernel takes exp(A_log)
        self.dtype, self.device = like.dtype, like.device
        self.fusable = (like.dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" for t in tensors)
                        and all(t.dtype in (like.dtype, torch.int8) for t in tensors))
        if self.fusable:
            from numba.typed import List

            norms = norm_weights if norm_weights is not None else [None] * len(layers)
            self.arrays = {name: List([_np(getattr(w, name), like) for w in layers]) for name in _LAYER_FIELDS}
            self.arrays["norm_w"] = List([_np(n, like) for n in norms])
            self.arrays["final_w"] = _np(final_weight, like)
            from ._numba_decode import exp_of

            self.arrays["a_exp"] = List([exp_of(a) for a in self.arrays["a_log"]])
            hw, hs, hb = head if head is not None else (like.new_empty(0, d_model), None, None)
            self.arrays["head"] = (_np(hw, like), _np(hs, like), _np(hb, like))

    def stale(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` (the plan's weights in the order it takes them: the layers' fields, the norms, the
        final norm, the head) need a new plan."""
        return not self.key.matches(tensors)


def _stacked(states: list[Tensor]) -> Tensor:
    """(L, ...) contiguous: the stacked tensor the states are views of (what the last step returned), or a copy."""
    base = states[0]._base
    if (base is not None and base.is_contiguous() and base.shape[0] == len(states)
            and tuple(base.shape[1:]) == tuple(states[0].shape)
            and all(s._base is base and s.data_ptr() == base[i].data_ptr() for i, s in enumerate(states))):
        return base.detach()
    return torch.stack([s.detach() for s in states])


def mamba_stack_step(h: Tensor, plan: MambaStackPlan, conv_states: list[Tensor], ssm_states: list[Tensor]
                     ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """One token through the stack of ``plan``: h (batch, d_model) residual stream -> (final-normed hidden
    (batch, d_model), new conv states, new ssm states, the head's output (batch, V) or None without a head).
    One kernel launch on CPU for float32/float64 inputs that need no gradient; torch ops otherwise.
    Oracle: :func:`ssmkit.ops.reference.mamba_stack_step`."""
    if not isinstance(plan, MambaStackPlan):
        raise TypeError(f"mamba_stack_step: plan must be a MambaStackPlan, got {type(plan).__name__}")
    n_layers = len(plan.layers)
    if len(conv_states) != n_layers or len(ssm_states) != n_layers:
        raise ValueError(f"mamba_stack_step: need {n_layers} conv and ssm states, got {len(conv_states)} and "
                         f"{len(ssm_states)}")
    for w, cs, ss in zip(plan.layers[:1], conv_states, ssm_states, strict=False):
        check_step_args(h, w, cs, ss)
    batch = h.shape[0]
    if any(tuple(c.shape) != tuple(conv_states[0].shape) for c in conv_states) or any(
            tuple(s.shape) != tuple(ssm_states[0].shape) for s in ssm_states):
        raise ValueError("mamba_stack_step: every layer's conv_state and ssm_state must have the same shapes")
    tensors = [h, *conv_states, *ssm_states]
    fused = (plan.fusable and batch > 0 and all(t.dtype == plan.dtype for t in tensors)
             and use_fused(*tensors) and not (torch.is_grad_enabled() and h.requires_grad)
             and not (torch.is_grad_enabled() and any(t.requires_grad for w in plan.layers for t in w
                                                      if t is not None)))
    if not fused:
        return stack_by_blocks(h, plan, conv_states, ssm_states, _torch_step)
    from . import _numba_decode as D

    a = plan.arrays
    w0 = plan.layers[0]
    di, rank, n_state = w0.d.shape[0], w0.dt_w.shape[1], w0.a_log.shape[1]
    resid = h.detach().clone()
    conv_all, ssm_all = _stacked(conv_states), _stacked(ssm_states)
    conv_new, ssm_new = torch.empty_like(conv_all), torch.empty_like(ssm_all)
    out = torch.empty_like(resid)
    head_w, head_s, head_b = a["head"]
    logits = h.new_empty(batch, head_w.shape[0])
    scratch = [h.new_empty(batch, n) for n in (h.shape[1], 2 * di, di, rank + 2 * n_state, di)]
    with kernel_threads(w0.in_w.numel() * batch * n_layers) as threads:
        counters = torch.zeros(D.counter_slots(5 * n_layers + 2, threads), dtype=torch.int64)
        D.mamba_stack(
            resid.numpy(), plan.residual, a["norm_w"], plan.eps, a["final_w"], plan.final_eps,
            a["in_w"], a["in_scale"], a["in_b"], a["conv_w"], a["conv_b"], conv_all.numpy(),
            a["x_w"], a["x_scale"], a["dt_w"], a["dt_b"], a["a_exp"], a["d"], a["out_w"], a["out_scale"], a["out_b"],
            ssm_all.numpy(), conv_new.numpy(), ssm_new.numpy(),
            *(t.numpy() for t in scratch), out.numpy(), head_w, head_s, head_b, logits.numpy(), counters.numpy(),
            threads, plan.act_quant, _NO_PROFILE)
    return (out, list(conv_new.unbind(0)), list(ssm_new.unbind(0)), logits if plan.head is not None else None)


_NO_PROFILE = np.zeros((0, 0), np.int64)  # the kernels' per-stage clock off (benchmarks/probe_decode_threads.py)

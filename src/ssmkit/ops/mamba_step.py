"""One recurrent Mamba (S6) token for a batch of rows: the decode step, fused into one kernel on CPU.

    y, conv_state, ssm_state = mamba_step(x, weights, conv_state, ssm_state)

x (batch, d_model) -> y (batch, d_model). With Di inner channels, N state size, R the rank of the Δ projection
and K the conv width::

    x_in, z = split(in_w x + in_b)                           # (batch, Di) each
    u       = silu(conv_w · [conv_state, x_in] + conv_b)     # depthwise causal conv over the last K inputs
    dt_low, B, C = split(x_w u)                              # (R, N, N)
    dt      = softplus(dt_w dt_low + dt_b)                   # (batch, Di)
    h       = exp(-dt exp(a_log)) h + (dt u) B               # (batch, Di, N)
    y       = out_w ((h C + d u) silu(z)) + out_b

States: conv_state (batch, Di, K - 1) holds the last K - 1 values of x_in, oldest first; ssm_state (batch, Di, N).
The new states are new tensors (the inputs are not modified).

On CPU, float32/float64 inputs that need no gradient run one numba launch per token (all four matrix products,
the conv, the scan update and the gate, split across threads by atomic work counters): decoding is bound by
reading the weights, and separate launches would each pay the cost of waking the threads. Anything else
(gradients, 16-bit inputs, other devices) runs the same computation in torch ops. The oracle is
:func:`ssmkit.ops.reference.mamba_step`.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .decode_linear import decode_fusable, dequantized
from .linear_scan import use_fused
from .q8_act import module_act_quant, q8_dequant
from .threads import kernel_threads


class MambaStepWeights(NamedTuple):
    """The parameters of a Mamba block as :func:`mamba_step` uses them (shapes as in transformers' MambaMixer)."""

    in_w: Tensor  # (2 Di, d_model)
    in_b: Tensor | None  # (2 Di,)
    conv_w: Tensor  # (Di, K)
    conv_b: Tensor | None  # (Di,)
    x_w: Tensor  # (R + 2N, Di)
    dt_w: Tensor  # (Di, R)
    dt_b: Tensor  # (Di,)
    a_log: Tensor  # (Di, N)
    d: Tensor  # (Di,)
    out_w: Tensor  # (d_model, Di)
    out_b: Tensor | None  # (d_model,)
    # int8 weight-only layers (ssmkit.ops.quantize_int8): in_w / x_w / out_w int8 with these per-row scales;
    # int4 (ssmkit.ops.int4_linear): in_w / x_w / out_w packed (rows, in / 2) with 2-D scales (rows, in / group)
    in_scale: Tensor | None = None  # (2 Di,) or (2 Di, d_model / group)
    x_scale: Tensor | None = None  # (R + 2N,) or (R + 2N, Di / group)
    out_scale: Tensor | None = None  # (d_model,) or (d_model, Di / group)


_OPTIONAL = frozenset({"in_b", "conv_b", "out_b", "in_scale", "x_scale", "out_scale"})


def _shape_error(name: str, want: tuple, got: Tensor | None) -> ValueError:
    desc = "None" if got is None else f"{tuple(got.shape)}"
    return ValueError(f"mamba_step: {name} must have shape {want}, got {desc}")


def check_step_args(x: Tensor, w: MambaStepWeights, conv_state: Tensor, ssm_state: Tensor) -> None:
    """Shapes consistent with each other; raises ValueError naming the argument."""
    if not isinstance(w, MambaStepWeights):
        raise TypeError(f"mamba_step: weights must be a MambaStepWeights, got {type(w).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"mamba_step: x must be (batch, d_model), got {getattr(x, 'shape', type(x).__name__)}")
    batch, d_model = x.shape
    if w.in_w.ndim != 2 or _cols(w.in_w, w.in_scale) != d_model or w.in_w.shape[0] % 2:
        raise _shape_error("weights.in_w", ("2 * d_inner", d_model), w.in_w)
    di = w.in_w.shape[0] // 2
    if w.conv_w.ndim != 2 or w.conv_w.shape[0] != di:
        raise _shape_error("weights.conv_w", (di, "width"), w.conv_w)
    width = w.conv_w.shape[1]
    if w.a_log.ndim != 2 or w.a_log.shape[0] != di:
        raise _shape_error("weights.a_log", (di, "d_state"), w.a_log)
    n_state = w.a_log.shape[1]
    if w.dt_w.ndim != 2 or w.dt_w.shape[0] != di:
        raise _shape_error("weights.dt_w", (di, "dt_rank"), w.dt_w)
    rank = w.dt_w.shape[1]
    expected = {"in_b": (2 * di,), "conv_b": (di,), "dt_b": (di,), "d": (di,), "out_b": (d_model,)}
    for name, shape in expected.items():
        t = getattr(w, name)
        if t is None and name in _OPTIONAL:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise _shape_error(f"weights.{name}", shape, t)
    for name, scale, shape in (("in_w", "in_scale", (2 * di, d_model)), ("x_w", "x_scale", (rank + 2 * n_state, di)),
                               ("out_w", "out_scale", (d_model, di))):
        t, sc = getattr(w, name), getattr(w, scale)
        if sc is not None and (not isinstance(sc, Tensor) or sc.ndim not in (1, 2) or sc.shape[0] != shape[0]
                               or (sc.ndim == 2 and not _valid_groups(shape[1], sc.shape[1]))):
            raise ValueError(f"mamba_step: weights.{scale} must be ({shape[0]},) (int8) or ({shape[0]}, groups) "
                             f"with groups dividing {shape[1]} into even groups (int4), got {_desc(sc)}")
        if not isinstance(t, Tensor) or t.ndim != 2 or (t.shape[0], _cols(t, sc)) != shape:
            want = shape if sc is None or sc.ndim == 1 else (shape[0], shape[1] // 2)
            raise _shape_error(f"weights.{name}", want, t)
        if (t.dtype == torch.int8) != (sc is not None):
            given = "given" if sc is not None else "None"
            raise ValueError(f"mamba_step: weights.{name} must be int8 exactly when weights.{scale} is given, "
                             f"got {t.dtype} with {scale} {given}")
    if not isinstance(conv_state, Tensor) or tuple(conv_state.shape) != (batch, di, width - 1):
        raise _shape_error("conv_state", (batch, di, width - 1), conv_state)
    if not isinstance(ssm_state, Tensor) or tuple(ssm_state.shape) != (batch, di, n_state):
        raise _shape_error("ssm_state", (batch, di, n_state), ssm_state)


def _desc(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _cols(w: Tensor, scale: Tensor | None) -> int:
    """The input features of a weight: packed int4 (a 2-D scale) holds two per byte."""
    return 2 * w.shape[1] if isinstance(scale, Tensor) and scale.ndim == 2 else w.shape[1]


def _valid_groups(cols: int, groups: int) -> bool:
    return groups > 0 and cols % groups == 0 and (cols // groups) % 2 == 0


def _weight(w: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    return dequantized(w, scale, dtype)


def _act(x: Tensor, scale: Tensor | None, act_quant: bool) -> Tensor:
    """x as a quantized weight's product sees it: quantized per block of 32 with ``act_quant``
    (:func:`ssmkit.ops.q8_act.q8_dequant`), else x itself."""
    if not act_quant or scale is None:
        return x
    return q8_dequant(x)


def _torch_step(x: Tensor, w: MambaStepWeights, conv_state: Tensor, ssm_state: Tensor, act_quant: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The step in torch ops (differentiable; 16-bit inputs accumulate the scan in ssm_state's dtype);
    ``act_quant``: the quantized weights multiply activations quantized per block of 32."""
    di = w.d.shape[0]
    rank = w.dt_w.shape[1]
    n_state = w.a_log.shape[1]
    xi, z = F.linear(_act(x, w.in_scale, act_quant), _weight(w.in_w, w.in_scale, x.dtype), w.in_b).split(
        di, dim=-1)
    window = torch.cat([conv_state, xi.unsqueeze(-1)], -1)  # (batch, Di, K)
    u = (window * w.conv_w).sum(-1)
    if w.conv_b is not None:
        u = u + w.conv_b
    u = F.silu(u)
    dt_low, B, C = F.linear(_act(u, w.x_scale, act_quant), _weight(w.x_w, w.x_scale, x.dtype)).split(
        [rank, n_state, n_state], dim=-1)
    acc = ssm_state.dtype
    dt = F.softplus(F.linear(dt_low, w.dt_w, w.dt_b).to(acc))
    uf = u.to(acc)
    dA = torch.exp(dt.unsqueeze(-1) * -torch.exp(w.a_log.to(acc)))  # (batch, Di, N)
    h = torch.addcmul(ssm_state * dA, (dt * uf).unsqueeze(-1), B.to(acc).unsqueeze(1))
    y = torch.bmm(h, C.to(acc).unsqueeze(-1)).squeeze(-1)
    y = torch.addcmul(y, uf, w.d.to(acc)) * F.silu(z.to(acc))
    y = _act(y.to(x.dtype), w.out_scale, act_quant)
    return F.linear(y, _weight(w.out_w, w.out_scale, x.dtype), w.out_b), window[:, :, 1:], h


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


def check_stack_extras(owner: str, n_layers: int, d_model: int, norm_weights: list[Tensor] | None,
                       final_weight: Tensor | None, head: tuple | None) -> None:
    """The block norms, final norm and head of a stack plan fit ``n_layers`` blocks of width ``d_model``."""
    if norm_weights is not None and (len(norm_weights) != n_layers
                                     or any(tuple(n.shape) != (d_model,) for n in norm_weights)):
        raise ValueError(f"{owner}: norm_weights must be {n_layers} tensors of shape ({d_model},)")
    if final_weight is not None and tuple(final_weight.shape) != (d_model,):
        raise ValueError(f"{owner}: final_weight must have shape ({d_model},), got {tuple(final_weight.shape)}")
    if head is not None:
        hw, hs, hb = head
        if (hw.ndim != 2 or _cols(hw, hs) != d_model or (hw.dtype == torch.int8) != (hs is not None)
                or (hs is not None and (hs.ndim not in (1, 2) or hs.shape[0] != hw.shape[0]
                                        or (hs.ndim == 2 and not _valid_groups(d_model, hs.shape[1]))))):
            raise ValueError(f"{owner}: head weight must be (V, {d_model}) (or packed int4 (V, {d_model // 2}) "
                             f"with a (V, groups) scale), int8 exactly when a scale is given, "
                             f"got {tuple(hw.shape)} {hw.dtype}")


def _rms_norm(h: Tensor, w: Tensor | None, eps: float) -> Tensor:
    return h if w is None else h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def stack_by_blocks(h: Tensor, plan, conv_states: list[Tensor], ssm_states: list[Tensor], step
                    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """A stack plan's step block by block in torch ops (differentiable; the path when the kernel does not apply):
    h <- h + step(rmsnorm(h)) per layer, the final norm, and the head if the plan has one. ``step(x, weights,
    conv_state, ssm_state, act_quant) -> (y, conv_state, ssm_state)`` is the family's one-layer step."""
    convs, ssms = [], []
    for i, w in enumerate(plan.layers):
        norm = None if plan.norm_weights is None else plan.norm_weights[i]
        y, c, s = step(_rms_norm(h, norm, plan.eps), w, conv_states[i], ssm_states[i], plan.act_quant)
        h = h + y if plan.residual else y
        convs.append(c)
        ssms.append(s)
    hidden = _rms_norm(h, plan.final_weight, plan.final_eps)
    logits = None
    if plan.head is not None:
        hw, hs, hb = plan.head
        logits = F.linear(_act(hidden, hs, plan.act_quant), dequantized(hw, hs, hidden.dtype), hb)
    return hidden, convs, ssms, logits


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


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NO_PROFILE = np.zeros((0, 0), np.int64)  # the kernels' per-stage clock off (benchmarks/probe_decode_threads.py)


def cached_plan(owner: object, weights: MambaStepWeights) -> MambaStackPlan:
    """The one-mixer plan of ``owner`` (e.g. the layer the weights belong to), rebuilt when the weights'
    storage or a copied weight changed (:class:`WeightsKey`). Plans live as long as their owner (a weak-keyed
    cache, so copies and pickles of the owner never see them)."""
    plan = _PLANS.get(owner)
    act_quant = module_act_quant(owner)
    if plan is None or plan.stale([t for t in weights if t is not None]) or plan.act_quant != act_quant:
        plan = MambaStackPlan([weights], residual=False, act_quant=act_quant)
        _PLANS[owner] = plan
    return plan


def mamba_step(x: Tensor, weights: MambaStepWeights, conv_state: Tensor, ssm_state: Tensor, *,
               owner: object | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One token: x (batch, d_model) -> (y (batch, d_model), new conv_state, new ssm_state) (module docstring).
    ``owner`` (e.g. the layer) caches the prepared weights between calls (:func:`cached_plan`)."""
    check_step_args(x, weights, conv_state, ssm_state)
    tensors = [t for t in (x, *weights, conv_state, ssm_state) if t is not None]
    if x.shape[0] == 0 or not decode_fusable(x, tensors):
        return _torch_step(x, weights, conv_state, ssm_state, module_act_quant(owner))
    if owner is None:
        plan = MambaStackPlan([weights], residual=False)
    else:
        plan = cached_plan(owner, weights)
    y, (conv,), (ssm,), _ = mamba_stack_step(x, plan, [conv_state], [ssm_state])
    return y, conv, ssm

"""One recurrent Mamba-2 (SSD) token for a batch of rows, and a stack of Mamba-2 blocks in one kernel launch.

    y, conv_state, ssm_state = mamba2_step(x, weights, conv_state, ssm_state)
    hidden, convs, ssms, logits = mamba2_stack_step(h, plan, convs, ssms)

x (batch, d_model) -> y (batch, d_model). With H heads of P channels (Di = H P), G groups of state size N and
conv width K (C = Di + 2 G N conv channels)::

    z, xBC, dt = split(in_w x + in_b)                       # (Di, C, H)
    x, B, C    = split(silu(conv_w · [conv_state, xBC] + conv_b))   # (Di, G N, G N)
    dt         = clamp(softplus(dt + dt_b), dt_limit)       # (batch, H)
    h[p]       = exp(-dt exp(a_log)) h[p] + dt x[p] B[g]    # head of channel p, its group g: (batch, H, P, N)
    y          = h C[g] + d x
    y          = out_w (group_rmsnorm(y silu(z)) norm_w) + out_b

States: conv_state (batch, C, K - 1), the last K - 1 xBC inputs oldest first; ssm_state (batch, H, P, N). The new
states are new tensors. On CPU, float32/float64 inputs that need no gradient run one numba launch per token for
the whole stack (the projections, with float, int8 or int4 weights, the conv, the state update, the gated norm,
the residual norms and an optional LM head; :mod:`._numba_decode_mamba2`); anything else runs the same
computation in torch ops. Oracle: :func:`ssmkit.ops.reference_mamba2.mamba2_step`.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .decode_linear import decode_fusable, dequantized
from .mamba_step import (
    _NO_PROFILE,
    WeightsKey,
    _act,
    _cols,
    _desc,
    _np,
    _stacked,
    _valid_groups,
    check_stack_extras,
    stack_by_blocks,
)
from .q8_act import module_act_quant
from .threads import kernel_threads


class Mamba2StepWeights(NamedTuple):
    """The parameters of a Mamba-2 block as :func:`mamba2_step` uses them (shapes as in transformers'
    Mamba2Mixer; the linear weights may be int8 with per-row scales or packed int4 with group scales)."""

    in_w: Tensor  # (Di + C + H, d_model): rows (z, x, B, C, dt)
    in_b: Tensor | None  # (Di + C + H,)
    conv_w: Tensor  # (C, K)
    conv_b: Tensor | None  # (C,)
    dt_b: Tensor  # (H,)
    a_log: Tensor  # (H,)
    d: Tensor  # (H,)
    norm_w: Tensor  # (Di,) the gated RMSNorm's weight
    out_w: Tensor  # (d_model, Di)
    out_b: Tensor | None  # (d_model,)
    ngroups: int  # G
    in_scale: Tensor | None = None
    out_scale: Tensor | None = None
    norm_eps: float = 1e-5
    dt_limit: tuple[float, float] = (0.0, math.inf)

    def tensors(self) -> list[Tensor]:
        """The tensor fields that are set, in field order."""
        return [t for t in self if isinstance(t, Tensor)]

    def dims(self) -> tuple[int, int, int, int, int]:
        """(Di, C, H, P, N)."""
        di, n_conv, heads = self.norm_w.shape[0], self.conv_w.shape[0], self.a_log.shape[0]
        return di, n_conv, heads, di // heads, (n_conv - di) // (2 * self.ngroups)


_FIELDS = ("in_w", "in_scale", "in_b", "conv_w", "conv_b", "dt_b", "a_log", "d", "norm_w", "out_w", "out_scale",
           "out_b")


def _err(name: str, want: object, got: object) -> ValueError:
    return ValueError(f"mamba2_step: {name} must be {want}, got {_desc(got) if got is not None else 'None'}")


def check_step_args(x: Tensor, w: Mamba2StepWeights, conv_state: Tensor, ssm_state: Tensor) -> None:
    """Shapes consistent with each other; raises ValueError naming the argument."""
    if not isinstance(w, Mamba2StepWeights):
        raise TypeError(f"mamba2_step: weights must be a Mamba2StepWeights, got {type(w).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise _err("x", "(batch, d_model)", x)
    batch, d_model = x.shape
    g = w.ngroups
    for name in ("norm_w", "a_log", "conv_w"):
        if not isinstance(getattr(w, name), Tensor) or getattr(w, name).ndim != (2 if name == "conv_w" else 1):
            raise _err(f"weights.{name}", "a 2-D tensor" if name == "conv_w" else "a 1-D tensor", getattr(w, name))
    di, n_conv, heads = w.norm_w.shape[0], w.conv_w.shape[0], w.a_log.shape[0]
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or heads < 1 or heads % g or di % heads \
            or (n_conv - di) % (2 * g) or n_conv <= di:
        raise ValueError(f"mamba2_step: weights need ngroups >= 1 dividing nheads {heads}, nheads dividing "
                         f"d_inner {di} and conv channels d_inner + 2 ngroups d_state, got ngroups={g!r}, "
                         f"{n_conv} conv channels")
    p, n = di // heads, (n_conv - di) // (2 * g)
    lo, hi = w.dt_limit
    if not 0 <= lo <= hi or not w.norm_eps > 0:
        raise ValueError(f"mamba2_step: need 0 <= dt_limit lo <= hi and norm_eps > 0, got {w.dt_limit}, "
                         f"{w.norm_eps}")
    rows = di + n_conv + heads
    shapes = {"in_b": (rows,), "conv_b": (n_conv,), "dt_b": (heads,), "d": (heads,), "out_b": (d_model,)}
    for name, shape in shapes.items():
        t = getattr(w, name)
        if (t is not None or name in ("dt_b", "d")) and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
            raise _err(f"weights.{name}", shape, t)
    for name, scale, (o, k) in (("in_w", "in_scale", (rows, d_model)), ("out_w", "out_scale", (d_model, di))):
        t, sc = getattr(w, name), getattr(w, scale)
        if sc is not None and (not isinstance(sc, Tensor) or sc.ndim not in (1, 2) or sc.shape[0] != o
                               or (sc.ndim == 2 and not _valid_groups(k, sc.shape[1]))):
            raise _err(f"weights.{scale}", f"({o},) (int8) or ({o}, groups) with even groups of {k} (int4)", sc)
        if not isinstance(t, Tensor) or t.ndim != 2 or (t.shape[0], _cols(t, sc)) != (o, k):
            raise _err(f"weights.{name}", (o, k), t)
        if (t.dtype == torch.int8) != (sc is not None):
            raise ValueError(f"mamba2_step: weights.{name} must be int8 exactly when weights.{scale} is given, "
                             f"got {t.dtype} with {scale} {'given' if sc is not None else 'None'}")
    width = w.conv_w.shape[1]
    if not isinstance(conv_state, Tensor) or tuple(conv_state.shape) != (batch, n_conv, width - 1):
        raise _err("conv_state", (batch, n_conv, width - 1), conv_state)
    if not isinstance(ssm_state, Tensor) or tuple(ssm_state.shape) != (batch, heads, p, n):
        raise _err("ssm_state", (batch, heads, p, n), ssm_state)


def _torch_step(x: Tensor, w: Mamba2StepWeights, conv_state: Tensor, ssm_state: Tensor, act_quant: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The step in torch ops (differentiable; 16-bit inputs accumulate the state in ssm_state's dtype);
    ``act_quant``: the quantized weights multiply activations quantized per block of 32."""
    batch = x.shape[0]
    di, n_conv, heads, p, n = w.dims()
    g = w.ngroups
    z, xbc, dt = F.linear(_act(x, w.in_scale, act_quant), dequantized(w.in_w, w.in_scale, x.dtype),
                          w.in_b).split([di, n_conv, heads], -1)
    window = torch.cat([conv_state, xbc.unsqueeze(-1)], -1)  # (batch, C, K)
    xbc = (window * w.conv_w).sum(-1)
    xs, B, C = F.silu(xbc if w.conv_b is None else xbc + w.conv_b).split([di, g * n, g * n], -1)
    acc = ssm_state.dtype
    dt = F.softplus(dt + w.dt_b).to(acc)
    lo, hi = w.dt_limit
    if lo > 0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    da = torch.exp(dt * -torch.exp(w.a_log.to(acc)))  # (batch, H)
    xh = xs.to(acc).view(batch, g, heads // g, p)
    hg = ssm_state.reshape(batch, g, heads // g, p, n)
    hg = torch.addcmul((dt.view(batch, g, -1, 1) * xh).unsqueeze(-1) * B.to(acc).view(batch, g, 1, 1, n),
                       hg, da.view(batch, g, -1, 1, 1))
    y = (hg @ C.to(acc).view(batch, g, 1, n, 1)).squeeze(-1)
    y = torch.addcmul(y, xh, w.d.to(acc).view(g, -1, 1)).reshape(batch, di) * F.silu(z.to(acc))
    y = y.view(batch, g, di // g)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + w.norm_eps)).reshape(batch, di) * w.norm_w
    out = F.linear(_act(y.to(x.dtype), w.out_scale, act_quant), dequantized(w.out_w, w.out_scale, x.dtype),
                   w.out_b)
    return out, window[:, :, 1:], hg.reshape(batch, heads, p, n)


class Mamba2StackPlan:
    """A stack of Mamba-2 blocks (h <- h + mamba2_l(rmsnorm_l(h)), then a final RMSNorm, then an optional head)
    prepared for :func:`mamba2_stack_step`: the weights as numpy views, built once and reused for every token.

    layers: one Mamba2StepWeights per block, all with the same shapes, dtypes and ngroups (dt_limit and norm_eps
    may differ); norm_weights, final_weight, head, norm_eps, final_eps, residual, act_quant and ``key`` as in
    :class:`ssmkit.ops.mamba_step.MambaStackPlan`.
    """

    def __init__(self, layers: list[Mamba2StepWeights], norm_weights: list[Tensor] | None = None,
                 final_weight: Tensor | None = None, *, norm_eps: float = 1e-5, final_eps: float = 1e-5,
                 residual: bool = True, head: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
                 act_quant: bool = False) -> None:
        if not layers or not all(isinstance(w, Mamba2StepWeights) for w in layers):
            raise ValueError("Mamba2StackPlan: layers must be a non-empty list of Mamba2StepWeights")
        if not isinstance(act_quant, bool):
            raise ValueError(f"Mamba2StackPlan: act_quant must be a bool, got {act_quant!r}")
        self.act_quant = act_quant
        first = layers[0]
        for i, w in enumerate(layers):
            for name in _FIELDS:
                a, b = getattr(w, name), getattr(first, name)
                if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or a.dtype != b.dtype)):
                    raise ValueError(f"Mamba2StackPlan: layers[{i}].{name} differs in shape or dtype from "
                                     f"layers[0].{name}")
            if w.ngroups != first.ngroups:
                raise ValueError(f"Mamba2StackPlan: layers[{i}].ngroups={w.ngroups} differs from layers[0]'s "
                                 f"{first.ngroups}")
        d_model = _cols(first.in_w, first.in_scale)
        check_stack_extras("Mamba2StackPlan", len(layers), d_model, norm_weights, final_weight, head)
        self.layers, self.residual, self.head = list(layers), residual, head
        self.norm_weights = None if norm_weights is None else list(norm_weights)
        self.eps, self.final_weight, self.final_eps = norm_eps, final_weight, final_eps
        tensors = [t for w in layers for t in w.tensors()] + list(norm_weights or [])
        tensors += ([final_weight] if final_weight is not None else []) + [t for t in (head or ()) if t is not None]
        self.key = WeightsKey(tensors)
        like = first.d
        self.dtype = like.dtype
        self.fusable = (like.dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" for t in tensors)
                        and all(t.dtype in (like.dtype, torch.int8) for t in tensors))
        if self.fusable:
            from numba.typed import List

            norms = norm_weights if norm_weights is not None else [None] * len(layers)
            self.arrays = {name: List([_np(getattr(w, name), like) for w in layers]) for name in _FIELDS}
            self.arrays["norm"] = List([_np(n, like) for n in norms])
            self.arrays["final_w"] = _np(final_weight, like)
            big = float(np.finfo(np.float32).max)  # the kernel's fast math assumes finite values
            self.arrays["consts"] = np.array([[w.dt_limit[0], min(w.dt_limit[1], big), w.norm_eps] for w in layers],
                                             dtype=_np(like, like).dtype)
            hw, hs, hb = head if head is not None else (like.new_empty(0, d_model), None, None)
            self.arrays["head"] = (_np(hw, like), _np(hs, like), _np(hb, like))

    def stale(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` (the plan's weights in the order it takes them) need a new plan."""
        return not self.key.matches(tensors)


def mamba2_stack_step(h: Tensor, plan: Mamba2StackPlan, conv_states: list[Tensor], ssm_states: list[Tensor]
                      ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """One token through the stack of ``plan``: h (batch, d_model) residual stream -> (final-normed hidden
    (batch, d_model), new conv states, new ssm states, the head's output (batch, V) or None without a head).
    One kernel launch on CPU for float32/float64 inputs that need no gradient; torch ops otherwise.
    Oracle: :func:`ssmkit.ops.reference_mamba2.mamba2_stack_step`."""
    if not isinstance(plan, Mamba2StackPlan):
        raise TypeError(f"mamba2_stack_step: plan must be a Mamba2StackPlan, got {type(plan).__name__}")
    n_layers = len(plan.layers)
    if len(conv_states) != n_layers or len(ssm_states) != n_layers:
        raise ValueError(f"mamba2_stack_step: need {n_layers} conv and ssm states, got {len(conv_states)} and "
                         f"{len(ssm_states)}")
    check_step_args(h, plan.layers[0], conv_states[0], ssm_states[0])
    if any(c.shape != conv_states[0].shape for c in conv_states) or any(
            s.shape != ssm_states[0].shape for s in ssm_states):
        raise ValueError("mamba2_stack_step: every layer's conv_state and ssm_state must have the same shapes")
    batch = h.shape[0]
    tensors = [h, *conv_states, *ssm_states]
    fused = (plan.fusable and batch > 0 and all(t.dtype == plan.dtype for t in tensors)
             and decode_fusable(h, tensors + [t for w in plan.layers for t in w.tensors()]))
    if not fused:
        return stack_by_blocks(h, plan, conv_states, ssm_states, _torch_step)
    from . import _numba_decode as D
    from . import _numba_decode_mamba2 as D2

    a = plan.arrays
    w0 = plan.layers[0]
    di, n_conv, heads, p, n = w0.dims()
    resid = h.detach().clone()
    conv_all, ssm_all = _stacked(conv_states), _stacked(ssm_states)
    conv_new, ssm_new = torch.empty_like(conv_all), torch.empty_like(ssm_all)
    out = torch.empty_like(resid)
    head_w, head_s, head_b = a["head"]
    logits = h.new_empty(batch, head_w.shape[0])
    scratch = [h.new_empty(batch, k) for k in (h.shape[1], di, n_conv, 2 * heads, di)]
    with kernel_threads(w0.in_w.numel() * batch * n_layers) as threads:
        counters = torch.zeros(D.counter_slots(D2.STAGES * n_layers + 2, threads), dtype=torch.int64)
        D2.mamba2_stack(
            resid.numpy(), plan.residual, a["norm"], plan.eps, a["final_w"], plan.final_eps,
            a["in_w"], a["in_scale"], a["in_b"], a["conv_w"], a["conv_b"], conv_all.numpy(),
            a["dt_b"], a["a_log"], a["d"], a["norm_w"], a["consts"], w0.ngroups, a["out_w"], a["out_scale"],
            a["out_b"], ssm_all.view(n_layers, batch, di, n).numpy(), conv_new.numpy(),
            ssm_new.view(n_layers, batch, di, n).numpy(), *(t.numpy() for t in scratch), out.numpy(),
            head_w, head_s, head_b, logits.numpy(), counters.numpy(), threads, plan.act_quant, _NO_PROFILE)
    return out, list(conv_new.unbind(0)), list(ssm_new.unbind(0)), logits if plan.head is not None else None


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settings(w: Mamba2StepWeights) -> tuple:
    return w.ngroups, w.norm_eps, tuple(w.dt_limit)


def mamba2_step(x: Tensor, weights: Mamba2StepWeights, conv_state: Tensor, ssm_state: Tensor, *,
                owner: object | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One token: x (batch, d_model) -> (y (batch, d_model), new conv_state, new ssm_state) (module docstring).
    ``owner`` (e.g. the layer) caches the prepared weights between calls, rebuilt when they change."""
    check_step_args(x, weights, conv_state, ssm_state)
    tensors = [x, *weights.tensors(), conv_state, ssm_state]
    act_quant = module_act_quant(owner)
    if x.shape[0] == 0 or not decode_fusable(x, tensors):
        return _torch_step(x, weights, conv_state, ssm_state, act_quant)
    plan = None if owner is None else _PLANS.get(owner)
    if (plan is None or plan.stale(weights.tensors()) or _settings(plan.layers[0]) != _settings(weights)
            or plan.act_quant != act_quant):
        plan = Mamba2StackPlan([weights], residual=False, act_quant=act_quant)
        if owner is not None:
            _PLANS[owner] = plan
    y, (conv,), (ssm,), _ = mamba2_stack_step(x, plan, [conv_state], [ssm_state])
    return y, conv, ssm

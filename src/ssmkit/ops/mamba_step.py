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

The parts live in :mod:`.mamba_step_weights` (weights and shape checks), :mod:`.mamba_step_torch` (the torch
path) and :mod:`.mamba_stack_plan` (the fused stack plan and step); their names are re-exported here.
"""

from __future__ import annotations

import weakref

from torch import Tensor

from .decode_linear import decode_fusable
from .mamba_stack_plan import _NO_PROFILE, MambaStackPlan, WeightsKey, _np, _stacked, mamba_stack_step
from .mamba_step_torch import _act, _rms_norm, _torch_step, _weight, stack_by_blocks
from .mamba_step_weights import (
    MambaStepWeights,
    _cols,
    _desc,
    _shape_error,
    _valid_groups,
    check_stack_extras,
    check_step_args,
)
from .q8_act import module_act_quant

__all__ = ["_NO_PROFILE", "MambaStackPlan", "MambaStepWeights", "WeightsKey", "_act", "_cols", "_desc", "_np",
           "_rms_norm", "_shape_error", "_stacked", "_torch_step", "_valid_groups", "_weight", "cached_plan",
           "check_stack_extras", "check_step_args", "mamba_stack_step", "mamba_step", "stack_by_blocks"]

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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

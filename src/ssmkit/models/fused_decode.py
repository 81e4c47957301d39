"""The decode step of a pure-Mamba, pure-Mamba-2 or pure-Mamba-3 backbone in one kernel launch
(:func:`ssmkit.ops.mamba_stack_step`, :func:`ssmkit.ops.mamba2_step.mamba2_stack_step`,
:func:`ssmkit.ops.mamba3_stack.mamba3_stack_step`).

A backbone whose blocks are all plain ``mamba`` mixers, all plain ``mamba2`` mixers or all ``mamba3`` mixers of one
shape (float linear layers for Mamba-3), with RMSNorm, no MLP and no active dropout, with an RMSNorm at the end,
steps all its blocks (and the LM head, for a CausalLM) in one launch:
decoding a token reads every weight once, and one launch per matrix product (or per layer) would spend a large
share of the token's time waking threads and in Python. The result equals the block-by-block step up to float
rounding (tests compare both, and both against the ops' oracles). Any other backbone, or a call that needs
gradients, takes the block-by-block path; in a hybrid, runs of plain Mamba or Mamba-2 blocks still take one launch
each (:func:`run_plans`), Mamba-3 blocks there step one by one.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..layers.base import linear_weights
from ..layers.mamba import Mamba, MambaState
from ..layers.mamba2 import Mamba2, Mamba2State
from ..layers.mamba3 import Mamba3, Mamba3State
from ..ops.decode_linear import decode_fusable, decode_linear
from ..ops.mamba2_step import Mamba2StackPlan, Mamba2StepWeights, mamba2_stack_step
from ..ops.mamba3_stack import Mamba3StackPlan, mamba3_stack_step
from ..ops.mamba_step import MambaStackPlan, WeightsKey, mamba_stack_step
from ..ops.q8_act import act_quant_of, module_act_quant, quantized_layers
from ._fused_cache import (  # noqa: F401 (_HOLDERS, _count_registration: tests read them here)
    _CACHE,
    _HOLDERS,
    _REGISTRATIONS,
    _Cached,
    _count_registration,
    _fresh,
    _hold,
)
from .outputs import ModelState


def _act_quant(layers: tuple) -> bool:
    return act_quant_of(layers, "fused decode")


def _mamba3_shape(mixer: Mamba3) -> tuple | None:
    """What the Mamba-3 layers of one stack launch must share, or None if the kernel cannot take the layer."""
    if type(mixer.in_proj) is not nn.Linear or type(mixer.out_proj) is not nn.Linear or any(
            n.weight is None or not isinstance(n.eps, float) for n in (mixer.B_norm, mixer.C_norm)):
        return None
    return (mixer.d_model, mixer.d_state, mixer.nheads, mixer.headdim, mixer.ngroups, mixer.mimo, mixer.rank,
            mixer.n_angles, mixer.in_proj.bias is None, mixer.out_proj.bias is None)


def _kind(backbone) -> type | None:
    """Mamba, Mamba2 or Mamba3 when every block is a plain mixer of that type fit for the fused step, else None."""
    if backbone.final_norm.kind != "rmsnorm":
        return None
    eps = backbone.final_norm.eps
    kind = type(backbone.blocks[0].mixer)
    if kind not in (Mamba, Mamba2, Mamba3):
        return None
    if kind is Mamba3:
        shape = _mamba3_shape(backbone.blocks[0].mixer)
        if shape is None or any(_mamba3_shape(b.mixer) != shape for b in backbone.blocks if type(b.mixer) is kind):
            return None
    for block in backbone.blocks:
        norm = block.norm
        if type(block.mixer) is not kind or block.mlp is not None or norm is None or norm.kind != "rmsnorm":
            return None
        if getattr(block.mixer, "variant", False):  # Mamba's opt-in block choices: the kernels lack them
            return None
        if norm.eps != eps or (block.training and block.dropout.p > 0) or block.residual_multiplier != 1.0:
            return None  # the stack kernels have no per-block residual multiplier
    return kind


def _mixer_settings(mixer: nn.Module) -> tuple:
    """A Mamba-2 mixer's plain attributes that the plan copies (a Mamba mixer has none)."""
    if type(mixer) is Mamba2:
        return mixer.ngroups, mixer.dt_limit, mixer._modules["norm"].eps
    if type(mixer) is Mamba3:
        return mixer.A_floor, mixer._modules["B_norm"].eps, mixer._modules["C_norm"].eps
    return ()


def _settings(backbone, norms: list[nn.Module]) -> tuple:
    blocks = backbone.blocks._modules.values()
    return (tuple((b.training, b.residual_multiplier) for b in blocks), tuple(getattr(n, "eps", None) for n in norms),
            tuple(_mixer_settings(b._modules["mixer"]) for b in blocks), backbone.final_norm.eps)


def mamba2_step_weights(mixer: Mamba2) -> Mamba2StepWeights:
    """A Mamba-2 layer's parameters as :func:`ssmkit.ops.mamba2_step.mamba2_step` takes them (its linear
    layers may be int8 or int4 weight-only)."""
    in_w, in_s, in_b = linear_weights(mixer.in_proj)
    out_w, out_s, out_b = linear_weights(mixer.out_proj)
    return Mamba2StepWeights(
        in_w=in_w, in_b=in_b, conv_w=mixer.conv1d.weight[:, 0], conv_b=mixer.conv1d.bias, dt_b=mixer.dt_bias,
        a_log=mixer.A_log, d=mixer.D, norm_w=mixer.norm.weight, out_w=out_w, out_b=out_b, ngroups=mixer.ngroups,
        in_scale=in_s, out_scale=out_s, norm_eps=mixer.norm.eps, dt_limit=mixer.dt_limit)


def stack_plan(backbone, head: nn.Module | None = None) -> MambaStackPlan | Mamba2StackPlan | Mamba3StackPlan | None:
    """The backbone's (cached) plan, with ``head`` (a linear layer, e.g. the LM head) in the same launch;
    rebuilt when the model changed; None if the backbone is not eligible."""
    owner = backbone if head is None else head
    cached = _CACHE.get(owner)
    if cached is not None and cached.registrations == _REGISTRATIONS[0]:
        norms = [b._modules.get("norm") for b in backbone.blocks._modules.values()]
        if _fresh(cached, _settings(backbone, norms)):
            return cached.plan
    if cached is None:
        _hold(owner)
    registrations = _REGISTRATIONS[0]
    norms = [block.norm for block in backbone.blocks]
    settings = _settings(backbone, norms)
    kind = _kind(backbone)
    if kind is None:
        _CACHE[owner] = _Cached(registrations, settings, WeightsKey([]), [], None)
        return None
    if kind is Mamba3:
        return _mamba3_plan(backbone, head, owner, registrations, settings)
    if kind is Mamba:
        layers = [block.mixer.step_weights() for block in backbone.blocks]
        tensors = [t for w in layers for t in w if t is not None]
    else:
        layers = [mamba2_step_weights(block.mixer) for block in backbone.blocks]
        tensors = [t for w in layers for t in w.tensors()]
    final = backbone.final_norm
    head_weights = None if head is None else linear_weights(head)
    quantized = quantized_layers(backbone, head)
    cls = MambaStackPlan if kind is Mamba else Mamba2StackPlan
    plan = cls(layers, [n.weight for n in norms], final.weight, norm_eps=final.eps, final_eps=final.eps,
               head=head_weights, act_quant=_act_quant(quantized))
    tensors += [n.weight for n in norms] + [final.weight]
    tensors += [t for t in (head_weights or ()) if t is not None]
    _CACHE[owner] = _Cached(registrations, settings, plan.key, tensors, plan, quantized,
                            tuple(m.act_quant for m in quantized))
    return plan


def _mamba3_plan(backbone, head: nn.Module | None, owner, registrations: int, settings: tuple
                 ) -> Mamba3StackPlan | None:
    """A pure Mamba-3 stack's plan (None, cached too, when the head is not a float linear layer)."""
    head_weights = None if head is None else linear_weights(head)
    if head_weights is not None and head_weights[1] is not None:
        _CACHE[owner] = _Cached(registrations, settings, WeightsKey([]), [], None)
        return None
    final = backbone.final_norm
    plan = Mamba3StackPlan([b.mixer.step_weights() for b in backbone.blocks], [b.norm.weight for b in backbone.blocks],
                           final.weight, norm_eps=final.eps, final_eps=final.eps, head=head_weights)
    tensors = [t for w in plan.layers for t in w.tensors()] + plan.norm_weights + [final.weight]
    tensors += [t for t in (head_weights or ()) if t is not None]
    _CACHE[owner] = _Cached(registrations, settings, plan.key, tensors, plan)
    return plan


def _mamba3_fused(backbone, plan: Mamba3StackPlan, h: Tensor, layers: list
                  ) -> tuple[Tensor, ModelState, Tensor | None] | None:
    # every weight goes to decode_fusable: a frozen layer 0 must not hide a later one that needs gradients
    if not plan.fusable or not all(type(s) is Mamba3State for s in layers) or not decode_fusable(
            h, [h, *plan.tensors]) or h.dtype != plan.dtype or h.shape[0] == 0:
        return None
    backbone.blocks[0].mixer._check_state(layers[0], h)  # shapes and dtypes; the stack step checks the rest
    hidden, states, out = mamba3_stack_step(h, plan, [(s.angle, s.ssm, s.k, s.x) for s in layers])
    return hidden, ModelState([Mamba3State(*s) for s in states]), out


def _block_kind(block: nn.Module) -> type | None:
    """Mamba or Mamba2 when the block is a plain pre-RMSNorm block of that mixer (no MLP, no active dropout)."""
    norm, kind = block._modules.get("norm"), type(block._modules["mixer"])
    if kind not in (Mamba, Mamba2) or block.mlp is not None or norm is None or norm.kind != "rmsnorm":
        return None
    if getattr(block._modules["mixer"], "variant", False):  # Mamba's opt-in block choices: the kernels lack them
        return None
    if block.residual_multiplier != 1.0:  # the stack kernels have no per-block residual multiplier
        return None
    return None if block.training and block.dropout.p > 0 else kind


def run_plans(backbone) -> list[tuple[int, int, MambaStackPlan | Mamba2StackPlan | None]] | None:
    """A hybrid backbone's (cached) runs: (start, stop, plan) for each maximal run of blocks [start, stop) that
    one stack launch can step (plain Mamba or plain Mamba-2 blocks, one norm eps; the plan has no final norm and
    no head), (start, stop, None) for the blocks between them; None when no run exists or a block has no
    pre-norm. Rebuilt when the model changed, like :func:`stack_plan`."""
    cached = _RUNS.get(backbone)
    norms = [b._modules.get("norm") for b in backbone.blocks._modules.values()]
    if _fresh(cached, _settings(backbone, norms)):
        return cached.plan
    if cached is None:
        _hold(backbone)
    registrations, settings = _REGISTRATIONS[0], _settings(backbone, norms)
    blocks = list(backbone.blocks)
    runs, tensors, i = [], [], 0
    while i < len(blocks) and all(n is not None for n in norms):
        kind, j = _block_kind(blocks[i]), i + 1
        if kind is None:
            runs.append((i, j, None))
            i = j
            continue
        while j < len(blocks) and _block_kind(blocks[j]) is kind and norms[j].eps == norms[i].eps:
            j += 1
        act = _act_quant(quantized_layers(*blocks[i:j]))
        if kind is Mamba:
            layers = [b.mixer.step_weights() for b in blocks[i:j]]
            plan = MambaStackPlan(layers, [n.weight for n in norms[i:j]], norm_eps=norms[i].eps, act_quant=act)
            tensors += [t for w in layers for t in w if t is not None]
        else:
            layers = [mamba2_step_weights(b.mixer) for b in blocks[i:j]]
            plan = Mamba2StackPlan(layers, [n.weight for n in norms[i:j]], norm_eps=norms[i].eps, act_quant=act)
            tensors += [t for w in layers for t in w.tensors()]
        tensors += [n.weight for n in norms[i:j]]
        runs.append((i, j, plan))
        i = j
    result = runs if any(plan is not None for _, _, plan in runs) else None
    quantized = quantized_layers(backbone)
    _RUNS[backbone] = _Cached(registrations, settings, WeightsKey(tensors), tensors, result, quantized,
                              tuple(m.act_quant for m in quantized))
    return result


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_run(backbone, plan, start: int, stop: int, h: Tensor, states: list) -> tuple[Tensor, list] | None:
    """Blocks [start, stop) in one launch: (h after them, their new states), or None if the call does not fit."""
    state_cls = Mamba2State if isinstance(plan, Mamba2StackPlan) else MambaState
    if not plan.fusable or h.dtype != plan.dtype or not all(type(s) is state_cls for s in states):
        return None
    backbone.blocks[start].mixer._check_state(states[0], h)
    step = mamba2_stack_step if state_cls is Mamba2State else mamba_stack_step
    h, convs, ssms, _ = step(h, plan, [s.conv for s in states], [s.ssm for s in states])
    return h, [state_cls(conv=c, ssm=s) for c, s in zip(convs, ssms, strict=True)]


def _hybrid_step(backbone, h: Tensor, state: ModelState, head: nn.Module | None
                 ) -> tuple[Tensor, ModelState, Tensor | None] | None:
    if torch.is_grad_enabled():  # the caller's block-by-block path (the runs would take torch ops anyway)
        return None
    runs = run_plans(backbone)
    if runs is None:
        return None
    layers, new = state.layers, list(state.layers)
    for start, stop, plan in runs:
        done = None if plan is None else _step_run(backbone, plan, start, stop, h, layers[start:stop])
        if done is not None:
            h, new[start:stop] = done
            continue
        for i in range(start, stop):
            h, new[i] = backbone.blocks[i].step(h, layers[i])
    hidden = backbone.final_hidden(h)
    out = None
    if head is not None:
        weight, scale, bias = linear_weights(head)
        out = decode_linear(hidden, weight, bias, scale=scale, act_quant=module_act_quant(head))
    return hidden, ModelState(new), out


def fused_step(backbone, h: Tensor, state: ModelState, head: nn.Module | None = None
               ) -> tuple[Tensor, ModelState, Tensor | None] | None:
    """h (batch, d_model) embedded inputs -> (hidden (batch, d_model), new state, head(hidden) or None), or
    None when the backbone or the call does not fit (the caller then steps block by block). A pure Mamba or
    Mamba-2 stack runs in one launch with its final norm and head; a hybrid steps each run of such blocks in
    one launch and the other blocks (attention, MLP blocks, other mixers) one by one."""
    layers = state.layers
    if len(layers) != len(backbone.blocks):
        return None
    plan = stack_plan(backbone, head)
    if plan is None:
        return _hybrid_step(backbone, h, state, head)
    if isinstance(plan, Mamba3StackPlan):
        return _mamba3_fused(backbone, plan, h, layers)
    state_cls = MambaState if isinstance(plan, MambaStackPlan) else Mamba2State
    if not plan.fusable or h.dtype != plan.dtype or not all(type(s) is state_cls for s in layers):
        return None
    backbone.blocks[0].mixer._check_state(layers[0], h)  # shapes and dtypes; the stack step checks the rest
    step = mamba2_stack_step if state_cls is Mamba2State else mamba_stack_step
    hidden, convs, ssms, out = step(h, plan, [s.conv for s in layers], [s.ssm for s in layers])
    return hidden, ModelState([state_cls(conv=c, ssm=s) for c, s in zip(convs, ssms, strict=True)]), out

"""The decode step of a pure-Mamba or pure-Mamba-2 backbone in one kernel launch
(:func:`ssmkit.ops.mamba_stack_step`, :func:`ssmkit.ops.mamba2_step.mamba2_stack_step`).

A backbone whose blocks are all plain ``mamba`` mixers, or all plain ``mamba2`` mixers, with RMSNorm, no MLP and no
active dropout, with an RMSNorm at the end, steps all its blocks (and the LM head, for a CausalLM) in one launch:
decoding a token reads every weight once, and one launch per matrix product (or per layer) would spend a large
share of the token's time waking threads and in Python. The result equals the block-by-block step up to float
rounding (tests compare both, and both against the ops' oracles). Any other backbone, or a call that needs
gradients, takes the block-by-block path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from ..layers.base import linear_weights
from ..layers.mamba import Mamba, MambaState
from ..layers.mamba2 import Mamba2, Mamba2State
from ..ops.mamba2_step import Mamba2StackPlan, Mamba2StepWeights, mamba2_stack_step
from ..ops.mamba_step import MambaStackPlan, WeightsKey, mamba_stack_step
from .outputs import ModelState

# Parameters, buffers and submodules are (re)registered on a module only when a model is built or changed (a new
# layer, load_state_dict(assign=True), ...). Counting registrations lets a decode step check its cached plan in
# microseconds instead of walking every block (about 1 ms per token for 24 blocks, 4% of a step). torch offers
# such hooks only process-wide, so they are installed only while some model holds a fused plan and removed when
# the last such model is gone: importing this module, or using ssmkit without fused decoding, changes nothing.
_REGISTRATIONS = [0]
_HOOKS: list = []  # the handles of the installed hooks
_HOLDERS = [0]  # live owners of a cached plan


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    _REGISTRATIONS[0] += 1


def _hold(owner: object) -> None:
    """Install the registration hooks (if not yet) for as long as ``owner`` lives."""
    if not _HOOKS:
        _HOOKS.extend(register(_count_registration) for register in (
            nn.modules.module.register_module_parameter_registration_hook,
            nn.modules.module.register_module_buffer_registration_hook,
            nn.modules.module.register_module_module_registration_hook))
        _REGISTRATIONS[0] += 1  # registrations made while no hook counted them: no older plan may be trusted
    _HOLDERS[0] += 1
    weakref.finalize(owner, _release)


def _release() -> None:
    _HOLDERS[0] -= 1
    if _HOLDERS[0] == 0:
        for handle in _HOOKS:
            handle.remove()
        _HOOKS.clear()


@dataclass
class _Cached:
    registrations: int
    settings: tuple  # per block (training, norm eps, mixer settings), the final norm eps: no hooks see them
    key: WeightsKey  # a `.data` swap, a dtype/device move or an in-place update of a copied weight breaks it
    tensors: list[Tensor]
    plan: MambaStackPlan | Mamba2StackPlan | None


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kind(backbone) -> type | None:
    """Mamba or Mamba2 when every block is a plain mixer of that type fit for the fused step, else None."""
    if backbone.final_norm.kind != "rmsnorm":
        return None
    eps = backbone.final_norm.eps
    kind = type(backbone.blocks[0].mixer)
    if kind not in (Mamba, Mamba2):
        return None
    for block in backbone.blocks:
        norm = block.norm
        if type(block.mixer) is not kind or block.mlp is not None or norm is None or norm.kind != "rmsnorm":
            return None
        if norm.eps != eps or (block.training and block.dropout.p > 0):
            return None
    return kind


def _mixer_settings(mixer: nn.Module) -> tuple:
    """A Mamba-2 mixer's plain attributes that the plan copies (a Mamba mixer has none)."""
    if type(mixer) is Mamba2:
        return mixer.ngroups, mixer.dt_limit, mixer._modules["norm"].eps
    return ()


def _settings(backbone, norms: list[nn.Module]) -> tuple:
    blocks = backbone.blocks._modules.values()
    return (tuple(b.training for b in blocks), tuple(getattr(n, "eps", None) for n in norms),
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


def stack_plan(backbone, head: nn.Module | None = None) -> MambaStackPlan | Mamba2StackPlan | None:
    """The backbone's (cached) plan, with ``head`` (a linear layer, e.g. the LM head) in the same launch;
    rebuilt when the model changed; None if the backbone is not eligible."""
    owner = backbone if head is None else head
    cached = _CACHE.get(owner)
    if cached is not None and cached.registrations == _REGISTRATIONS[0]:
        norms = [b._modules.get("norm") for b in backbone.blocks._modules.values()]
        if (cached.settings == _settings(backbone, norms)
                and cached.key.matches(cached.tensors)):
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
    if kind is Mamba:
        layers = [block.mixer.step_weights() for block in backbone.blocks]
        tensors = [t for w in layers for t in w if t is not None]
    else:
        layers = [mamba2_step_weights(block.mixer) for block in backbone.blocks]
        tensors = [t for w in layers for t in w.tensors()]
    final = backbone.final_norm
    head_weights = None if head is None else linear_weights(head)
    cls = MambaStackPlan if kind is Mamba else Mamba2StackPlan
    plan = cls(layers, [n.weight for n in norms], final.weight, norm_eps=final.eps, final_eps=final.eps,
               head=head_weights)
    tensors += [n.weight for n in norms] + [final.weight]
    tensors += [t for t in (head_weights or ()) if t is not None]
    _CACHE[owner] = _Cached(registrations, settings, plan.key, tensors, plan)
    return plan


def fused_step(backbone, h: Tensor, state: ModelState, head: nn.Module | None = None
               ) -> tuple[Tensor, ModelState, Tensor | None] | None:
    """h (batch, d_model) embedded inputs -> (hidden (batch, d_model), new state, head(hidden) or None), or
    None when the backbone or the call does not fit (the caller then steps block by block)."""
    layers = state.layers
    state_cls = type(layers[0]) if layers else None
    if state_cls not in (MambaState, Mamba2State) or not all(type(s) is state_cls for s in layers):
        return None
    plan = stack_plan(backbone, head)
    if plan is None or not plan.fusable or h.dtype != plan.dtype:
        return None
    mamba2 = isinstance(plan, Mamba2StackPlan)
    if mamba2 != (state_cls is Mamba2State):
        return None
    backbone.blocks[0].mixer._check_state(layers[0], h)  # shapes and dtypes; the stack step checks the rest
    step = mamba2_stack_step if mamba2 else mamba_stack_step
    hidden, convs, ssms, out = step(h, plan, [s.conv for s in layers], [s.ssm for s in layers])
    return hidden, ModelState([state_cls(conv=c, ssm=s) for c, s in zip(convs, ssms, strict=True)]), out

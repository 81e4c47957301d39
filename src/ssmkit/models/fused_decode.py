"""The decode step of a pure-Mamba backbone in one kernel launch (:func:`ssmkit.ops.mamba_stack_step`).

A backbone whose blocks are all plain ``mamba`` mixers with RMSNorm, no MLP and no active dropout, with an RMSNorm
at the end, steps all its blocks (and the LM head, for a CausalLM) in one launch: decoding a token reads every
weight once, and one launch per matrix product (or per layer) would spend a large share of the token's time waking
threads and in Python. The result equals the block-by-block step up to float rounding (tests compare both, and both
against the ops' oracles). Any other backbone, or a call that needs gradients, takes the block-by-block path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from ..layers.base import linear_weights
from ..layers.mamba import Mamba, MambaState
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
    settings: tuple  # per block (training, norm eps) and the final norm eps: plain attributes, no hooks see them
    key: WeightsKey  # a `.data` swap, a dtype/device move or an in-place update of a copied weight breaks it
    tensors: list[Tensor]
    plan: MambaStackPlan | None


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _eligible(backbone) -> bool:
    if backbone.final_norm.kind != "rmsnorm":
        return False
    eps = backbone.final_norm.eps
    for block in backbone.blocks:
        if type(block.mixer) is not Mamba or block.mlp is not None or block.norm.kind != "rmsnorm":
            return False
        if block.norm.eps != eps or (block.training and block.dropout.p > 0):
            return False
    return True


def _settings(backbone, norms: list[nn.Module]) -> tuple:
    return (tuple(b.training for b in backbone.blocks._modules.values()), tuple(n.eps for n in norms),
            backbone.final_norm.eps)


def stack_plan(backbone, head: nn.Module | None = None) -> MambaStackPlan | None:
    """The backbone's (cached) plan, with ``head`` (a linear layer, e.g. the LM head) in the same launch;
    rebuilt when the model changed; None if the backbone is not eligible."""
    owner = backbone if head is None else head
    cached = _CACHE.get(owner)
    if cached is not None and cached.registrations == _REGISTRATIONS[0]:
        norms = [b._modules["norm"] for b in backbone.blocks._modules.values()]
        if (cached.settings == _settings(backbone, norms)
                and cached.key.matches(cached.tensors)):
            return cached.plan
    if cached is None:
        _hold(owner)
    registrations = _REGISTRATIONS[0]
    norms = [block.norm for block in backbone.blocks]
    settings = _settings(backbone, norms)
    if not _eligible(backbone):
        _CACHE[owner] = _Cached(registrations, settings, WeightsKey([]), [], None)
        return None
    layers = [block.mixer.step_weights() for block in backbone.blocks]
    final = backbone.final_norm
    head_weights = None if head is None else linear_weights(head)
    plan = MambaStackPlan(layers, [n.weight for n in norms], final.weight, norm_eps=final.eps, final_eps=final.eps,
                          head=head_weights)
    tensors = [t for w in layers for t in w if t is not None] + [n.weight for n in norms] + [final.weight]
    tensors += [t for t in (head_weights or ()) if t is not None]
    _CACHE[owner] = _Cached(registrations, settings, plan.key, tensors, plan)
    return plan


def fused_step(backbone, h: Tensor, state: ModelState, head: nn.Module | None = None
               ) -> tuple[Tensor, ModelState, Tensor | None] | None:
    """h (batch, d_model) embedded inputs -> (hidden (batch, d_model), new state, head(hidden) or None), or
    None when the backbone or the call does not fit (the caller then steps block by block)."""
    layers = state.layers
    if not all(type(s) is MambaState for s in layers):
        return None
    plan = stack_plan(backbone, head)
    if plan is None or not plan.fusable or h.dtype != plan.dtype:
        return None
    mixer = backbone.blocks[0].mixer
    mixer._check_state(layers[0], h)  # shapes and dtypes; mamba_stack_step checks the rest are alike
    hidden, convs, ssms, out = mamba_stack_step(h, plan, [s.conv for s in layers], [s.ssm for s in layers])
    return hidden, ModelState([MambaState(conv=c, ssm=s) for c, s in zip(convs, ssms, strict=True)]), out

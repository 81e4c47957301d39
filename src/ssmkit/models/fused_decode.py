"""The decode step of a pure-Mamba backbone in one kernel launch (:func:`ssmkit.ops.mamba_stack_step`).

A backbone whose blocks are all plain ``mamba`` mixers with RMSNorm, no MLP and no active dropout, with an RMSNorm
at the end, steps all its blocks (and the LM head, for a CausalLM) in one launch: decoding a token reads every
weight once, and one launch per matrix product (or per layer) would spend a large share of the token's time waking
threads and in Python. The result equals the block-by-block step up to float rounding (tests compare both, and both
against the ops' oracles). Any other backbone, or a call that needs gradients, takes the block-by-block path.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.base import linear_weights
from ..layers.mamba import Mamba, MambaState
from ..ops.mamba_step import MambaStackPlan, cached_plan, mamba_stack_step
from .outputs import ModelState


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


def stack_plan(backbone, head: nn.Module | None = None) -> MambaStackPlan | None:
    """The backbone's (cached) plan, with ``head`` (a linear layer, e.g. the LM head) in the same launch;
    rebuilt when a weight's storage changed; None if the backbone is not eligible."""
    if not _eligible(backbone):
        return None
    layers = [block.mixer.step_weights() for block in backbone.blocks]
    norms = [block.norm.weight for block in backbone.blocks]
    final = backbone.final_norm
    owner = backbone if head is None else head
    return cached_plan(owner, layers, norms, final.eps, final.weight, final.eps,
                       head=None if head is None else linear_weights(head))


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

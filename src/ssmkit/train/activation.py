"""Activation checkpointing per backbone block.

Each block's ``forward`` is replaced, on the instance, by one that runs the original under
``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state preserved so dropout masks replay): only the
block's input is kept for the backward pass and its activations are recomputed there. Parameter names and
``state_dict`` keys are unchanged, so checkpoints are unaffected. Recurrent-state calls (``state`` given or
``return_state=True``) run unwrapped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ATTR = "_ssmkit_unwrapped_forward"


def _blocks(model: nn.Module) -> nn.ModuleList:
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"activation checkpointing needs an ssmkit model with backbone.blocks, got "
                        f"{type(model).__name__}")
    return blocks


def _needs_checkpoint(block: nn.Module, state: object, kw: dict) -> bool:
    """Checkpoint only plain training forwards: gradients on, training mode, no recurrent state passed or
    returned (``return_final_state=True``, or its deprecated alias ``return_state``)."""
    wants_state = kw.get("return_final_state") or kw.get("return_state")
    return block.training and torch.is_grad_enabled() and state is None and not wants_state


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of ``model``'s backbone; returns the number of blocks wrapped (idempotent)."""
    n = 0
    for block in _blocks(model):
        if _ATTR in block.__dict__:
            continue
        original = block.forward

        def forward(h, state=None, *, _orig=original, _block=block, **kw):
            if not _needs_checkpoint(_block, state, kw):
                return _orig(h, state, **kw)
            return checkpoint(_orig, h, None, use_reentrant=False, **kw)

        block.__dict__[_ATTR] = original
        block.forward = forward
        n += 1
    return n


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_activation_checkpointing`; returns the number of blocks unwrapped."""
    n = 0
    for block in _blocks(model):
        original = block.__dict__.pop(_ATTR, None)
        if original is not None:
            del block.__dict__["forward"]
            n += 1
    return n


def is_checkpointing(model: nn.Module) -> bool:
    return any(_ATTR in b.__dict__ for b in _blocks(model))

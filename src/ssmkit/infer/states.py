"""Assembling one batch state from the states of separately prefilled groups of rows.

Recurrent states have the same shape for every row, so they are scattered into place. Attention KV caches
(:class:`~ssmkit.layers.attention.AttentionState`) of different lengths are left-padded with zeros to a common
length: their ``pos`` field already makes only each row's own last entries visible, so the padding is masked.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.base import LayerState
from ..models.outputs import ModelState


def _is_kv_cache(state: LayerState) -> bool:
    from ..layers.attention import AttentionState

    return isinstance(state, AttentionState)


def _merge_tensors(parts: list[Tensor], rows: list[Tensor], batch: int, pad_dim: int | None,
                   where: str) -> Tensor:
    if pad_dim is not None:
        n = max(t.shape[pad_dim] for t in parts)
        parts = [F.pad(t, (0, 0) * (t.ndim - 1 - pad_dim) + (n - t.shape[pad_dim], 0)) for t in parts]
    shapes = {tuple(t.shape[1:]) for t in parts}
    if len(shapes) != 1:
        raise RuntimeError(f"cannot batch the prefilled states of {where}: per-row shapes differ {sorted(shapes)}")
    first = parts[0]
    out = torch.empty((batch, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for t, r in zip(parts, rows, strict=True):
        out[r] = t
    return out


def _merge_layer(parts: list[LayerState], rows: list[Tensor], batch: int, where: str) -> LayerState:
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        raise RuntimeError(f"{where}: states of different types {sorted(k.__name__ for k in kinds)}")
    kv = _is_kv_cache(parts[0])
    values = {}
    for f in dataclasses.fields(parts[0]):
        vs = [getattr(p, f.name) for p in parts]
        if isinstance(vs[0], LayerState):
            values[f.name] = _merge_layer(vs, rows, batch, f"{where}.{f.name}")
        elif isinstance(vs[0], Tensor):
            pad_dim = 2 if kv and f.name in ("k", "v") else None
            values[f.name] = _merge_tensors(vs, rows, batch, pad_dim, f"{where}.{f.name}")
        else:
            if any(v != vs[0] for v in vs[1:]):
                raise RuntimeError(f"{where}.{f.name}: non-tensor state fields differ between groups")
            values[f.name] = vs[0]
    return type(parts[0])(**values)


def merge_states(parts: list[ModelState], rows: list[Tensor], batch: int) -> ModelState:
    """One ModelState for ``batch`` rows from group states: ``parts[g]`` holds rows ``rows[g]`` (n_g,) in order."""
    if len(parts) == 1 and rows[0].shape[0] == batch and bool(
        torch.equal(rows[0], torch.arange(batch, device=rows[0].device))
    ):
        return parts[0]
    layers = [_merge_layer([p.layers[i] for p in parts], rows, batch, f"layer {i}")
              for i in range(len(parts[0].layers))]
    return ModelState(layers)

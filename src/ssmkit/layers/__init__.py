"""Sequence layers, one SSM family per file, all honouring the contract in :mod:`ssmkit.layers.base`."""

from __future__ import annotations

import importlib

from .base import LayerState, SequenceLayer

_EXPORTS = {
    "S4D": "s4d",
    "S4": "s4",
    "H3": "h3",
    "LongConv": "longconv",
    "Mamba": "mamba",
    "Mamba2": "mamba2",
    "Mamba3": "mamba3",
    "GatedSSM": "gated",
    "RGLRU": "gated",
    "Attention": "attention",
    "Bidirectional": "bidirectional",
    "PrefixBidirectional": "bidirectional",
}

__all__ = ["LayerState", "SequenceLayer", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ssmkit.layers' has no attribute {name!r}")

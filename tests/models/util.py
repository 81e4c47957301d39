"""Tiny model builders shared by the model tests."""

from __future__ import annotations

import functools

import torch

from ssmkit.models import ModelConfig

VOCAB = 13
D = 8

#: small per-mixer options so every layer is tiny
OPTIONS = {
    "mamba": {"d_state": 4},
    "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
    "s4d": {"d_state": 4},
    "s4": {"d_state": 4},
    "h3": {"d_state": 4},
    "longconv": {"kernel_len": 16},
    "attn": {"n_heads": 2},
}


def tiny_config(pattern: str, **kw) -> ModelConfig:
    base = dict(d_model=D, pattern=pattern, mixer_options=OPTIONS)
    if "d_input" not in kw:
        base["vocab_size"] = VOCAB
    return ModelConfig(**{**base, **kw})


@functools.cache
def cached_model(head: type, pattern: str, seed: int = 0, **kw):
    """A float64 eval-mode model (cached per arguments; tests must not modify it)."""
    torch.manual_seed(seed)
    return head(tiny_config(pattern, **kw)).double().eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)

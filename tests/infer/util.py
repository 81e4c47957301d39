"""Tiny models and an independent generation oracle for the inference tests."""

from __future__ import annotations

import functools

import torch

from ssmkit.infer import filter_logits, sample_from_logits
from ssmkit.models import CausalLM, ModelConfig

VOCAB = 17
D = 16

OPTIONS = {
    "mamba": {"d_state": 4},
    "mamba2": {"d_state": 4, "headdim": 4, "chunk_size": 4},
    "s4d": {"d_state": 4},
    "h3": {"d_state": 4},
    "attn": {"n_heads": 2},
}


def tiny_model(pattern: str, head: type = CausalLM, seed: int = 0, mixer_options: dict | None = None,
               **kw) -> CausalLM:
    """A float64 eval-mode model with randomised weights (cached: tests must not modify it)."""
    return _tiny_model(pattern, head, seed, repr(mixer_options or {}), **kw)


@functools.cache
def _tiny_model(pattern: str, head: type, seed: int, options: str, **kw) -> CausalLM:
    torch.manual_seed(seed)
    opts = {**OPTIONS, **eval(options)}
    cfg = ModelConfig(d_model=D, pattern=pattern, vocab_size=VOCAB, mixer_options=opts, **kw)
    model = head(cfg).double().eval()
    randomise(model, seed)
    return model


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its default (tiny embeddings make a fresh model's greedy output constant)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "embedding" in name else 0.3
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def oracle(model: CausalLM, prompt: torch.Tensor, n: int, *, temperature: float = 0.0, top_k=None, top_p=None,
           seed: int | None = None, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One prompt (length,) -> n tokens, recomputing the full parallel forward over the growing sequence at every
    step (no recurrent state at all). Sampling draws one uniform per step from a generator seeded with ``seed``."""
    seq = prompt[None]
    g = None if seed is None else torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pm = None
        if prefix_mask is not None:
            pm = torch.zeros(1, seq.shape[1], dtype=torch.bool)
            pm[0, : prefix_mask.shape[0]] = prefix_mask
        logits = model(seq, prefix_mask=pm).logits[:, -1]
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            u = torch.rand((), dtype=torch.float64, generator=g).reshape(1)
            tok = sample_from_logits(filter_logits(logits, temperature, top_k, top_p), u)
        out.append(int(tok))
        seq = torch.cat([seq, tok[:, None]], 1)
    return torch.tensor(out, dtype=torch.long)

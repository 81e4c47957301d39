"""Mixer names -> sequence layers: the vocabulary of a model's block pattern.

Plain mixers (one :mod:`ssmkit.layers` class each):

    mamba   Mamba         mamba2  Mamba2        mamba3  Mamba3    s4d   S4D       s4  S4       h3  H3
    longconv LongConv     gated   GatedSSM      rglru RGLRU     attn Attention (causal by default)
    gqa GQAttention       ffn FeedForward       moe MoE         normed-mamba NormedMamba
    griffin GriffinRecurrent                    local-gqa LocalGQAttention  (RecurrentGemma)
    s6 S6                 h3-s6 H3S6            mamba-s4d MambaS4D   (Mamba's Table 1 ablations)

Wrapped mixers:

    prefix-gated, prefix-rglru, prefix-mamba, prefix-s4d   PrefixBidirectional(kind=...) (Birdie)
    prefix-attn                                            Attention(mask="prefix")
    bi-gated, bi-rglru, bi-mamba, bi-mamba2, bi-s4d         Bidirectional(...) (non-causal; no state, no step)

Options (``ModelConfig.mixer_options``, mixer name -> constructor kwargs): a wrapped mixer ``prefix-X`` or
``bi-X`` gets X's options updated by its own (so a PrefixLM's prefix layers share the causal layers' sizes);
``bi-X`` options may also hold ``combine`` ("sum" | "concat") for the wrapper. ``d_model``, ``reverse``,
``device`` and ``dtype`` are set by the model and cannot be options; neither can ``mask`` for prefix-attn.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ..layers.base import SequenceLayer

#: plain mixer name -> (ssmkit.layers module, class name)
_PLAIN: dict[str, tuple[str, str]] = {
    "mamba": ("mamba", "Mamba"),
    "mamba2": ("mamba2", "Mamba2"),
    "mamba3": ("mamba3", "Mamba3"),
    "s4d": ("s4d", "S4D"),
    "s4": ("s4", "S4"),
    "h3": ("h3", "H3"),
    "longconv": ("longconv", "LongConv"),
    "gated": ("gated", "GatedSSM"),
    "rglru": ("gated", "RGLRU"),
    "attn": ("attention", "Attention"),
    # for transformers' hybrid families (ssmkit.interop): GQA attention, MLP and MoE blocks, Mamba with dt/B/C norms
    "gqa": ("gqa", "GQAttention"), "ffn": ("ffn", "FeedForward"), "moe": ("moe", "MoE"),
    "normed-mamba": ("normed_mamba", "NormedMamba"), "parallel-h1": ("falcon_h1", "ParallelHybrid"),
    "zamba2": ("zamba2_shared", "Zamba2Hybrid"),  # Zamba2's hybrid layer (shared attention + MLP, then Mamba-2)
    "griffin": ("griffin", "GriffinRecurrent"), "local-gqa": ("local_gqa", "LocalGQAttention"),  # RecurrentGemma
    # the Mamba paper's Table 1 ablations: selective SSM without a gate, H3 with S6, Mamba with S4D
    "s6": ("ablation", "S6"), "h3-s6": ("ablation", "H3S6"), "mamba-s4d": ("ablation", "MambaS4D"),
}
#: mixers that have a prefix-bidirectional form ("prefix-" + name)
PREFIXABLE = ("gated", "rglru", "mamba", "s4d", "attn")
#: mixers that have a (non-causal) bidirectional form ("bi-" + name)
BIDIRECTIONAL = ("gated", "rglru", "mamba", "mamba2", "s4d")
#: constructor arguments the model sets itself
_RESERVED = ("d_model", "reverse", "device", "dtype")


@dataclass(frozen=True)
class MixerSpec:
    """What a mixer name means.

    kind: "plain", "prefix" (PrefixBidirectional or prefix-masked attention) or "bi" (Bidirectional).
    base: the plain mixer it wraps (itself for plain mixers).
    causal: outputs at t depend only on inputs <= t when no prefix_mask is given.
    """

    name: str
    kind: str
    base: str

    @property
    def causal(self) -> bool:
        return self.kind != "bi"

    @property
    def accepts_prefix(self) -> bool:
        return self.kind == "prefix"


MIXERS: dict[str, MixerSpec] = {
    **{n: MixerSpec(n, "plain", n) for n in _PLAIN},
    **{f"prefix-{n}": MixerSpec(f"prefix-{n}", "prefix", n) for n in PREFIXABLE},
    **{f"bi-{n}": MixerSpec(f"bi-{n}", "bi", n) for n in BIDIRECTIONAL},
}


def mixer_names() -> tuple[str, ...]:
    """Every valid mixer name."""
    return tuple(MIXERS)


def get_spec(name: object, where: str = "mixer") -> MixerSpec:
    """The spec of a mixer name; the error lists the valid names."""
    if not isinstance(name, str) or name not in MIXERS:
        raise ValueError(f"{where}: unknown mixer {name!r}; expected one of {', '.join(MIXERS)}")
    return MIXERS[name]


def _layer_class(base: str) -> type[SequenceLayer]:
    module, cls = _PLAIN[base]
    return getattr(importlib.import_module(f"ssmkit.layers.{module}"), cls)


def allowed_options(name: str) -> tuple[str, ...]:
    """The option names a mixer accepts (its layer's constructor arguments minus the reserved ones)."""
    spec = get_spec(name)
    params = inspect.signature(_layer_class(spec.base)).parameters.values()
    names = [
        p.name for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RESERVED
    ]
    if spec.kind == "prefix" and spec.base == "attn":
        names.remove("mask")
    if spec.kind == "bi":
        names.append("combine")
    return tuple(names)


def merged_options(name: str, mixer_options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The options mixer ``name`` is built with: its base's options updated by its own."""
    spec = get_spec(name)
    opts = dict(mixer_options.get(spec.base, {})) if spec.kind != "plain" else {}
    opts.update(mixer_options.get(name, {}))
    if spec.kind == "prefix" and spec.base == "attn":
        opts.pop("mask", None)  # the base attn's mask (e.g. "causal") is replaced by "prefix"
    return opts


def build_mixer(name: str, d_model: int, mixer_options: dict[str, dict[str, Any]]) -> SequenceLayer:
    """Construct mixer ``name`` of width ``d_model``; layer errors are re-raised naming mixer and options."""
    spec = get_spec(name)
    opts = merged_options(name, mixer_options)
    try:
        if spec.kind == "plain":
            return _layer_class(spec.base)(d_model, **opts)
        if spec.kind == "prefix":
            if spec.base == "attn":
                return _layer_class("attn")(d_model, mask="prefix", **opts)
            from ..layers.bidirectional import PrefixBidirectional

            return PrefixBidirectional(d_model, kind=spec.base, **opts)
        from ..layers.bidirectional import Bidirectional

        combine = opts.pop("combine", "sum")
        return Bidirectional(_layer_class(spec.base)(d_model, **opts), combine=combine)
    except (TypeError, ValueError) as e:
        raise ValueError(f"mixer {name!r} (d_model={d_model}, options {opts}): {e}") from e

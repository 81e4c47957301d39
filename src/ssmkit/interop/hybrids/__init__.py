"""transformers interop for the hybrid families: FalconMamba, Bamba, NemotronH, Jamba, GraniteMoeHybrid, FalconH1,
RecurrentGemma, Zamba2.

Each family is one module describing its config translation and its block layout (:mod:`.engine`). In ssmkit a
hybrid model is an ordinary :class:`~ssmkit.models.CausalLM` whose pattern spells every sub-block out: a
transformers layer "mixer, then MLP" becomes two ssmkit pre-norm residual blocks (``mamba2``/``gqa`` then
``ffn``/``moe``), which computes the same function. See docs/interop.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...models.heads import CausalLM
from . import bamba, falcon_h1, falcon_mamba, granite, jamba, nemotron_h, recurrent_gemma, zamba2
from .engine import Family, from_hf, hf_config, to_hf

#: transformers model_type -> family
_MODULES = (falcon_mamba, bamba, nemotron_h, jamba, granite, falcon_h1, recurrent_gemma, zamba2)
FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}
#: transformers CausalLM class name -> family
BY_CLASS: dict[str, Family] = {f.hf_class: f for f in FAMILIES.values()}
#: families whose weights need more than renaming (RecurrentGemma's norms hold w, ssmkit's the scale 1 + w;
#: Zamba2's shared blocks, whose weights transformers repeats under every layer using them)
_OWN_CONVERSION = {m.FAMILY.model_type: m for m in (recurrent_gemma, zamba2)}


def family_of(name: str) -> Family:
    """A family by model_type ("bamba") or class name ("BambaForCausalLM")."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in BY_CLASS:
        return BY_CLASS[name]
    raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {name!r}")


def detect_family(model: CausalLM) -> Family | None:
    """The one hybrid family whose transformers config can describe ``model``, or None when none or several
    can (then ``family=`` must be given)."""
    fits = []
    for fam in FAMILIES.values():
        try:
            fam.hf_fields(model)
        except (TypeError, ValueError):
            continue
        fits.append(fam)
    return fits[0] if len(fits) == 1 else None


def hybrid_from_transformers(hf: nn.Module) -> CausalLM:
    """An ssmkit CausalLM equal to a transformers hybrid LM object."""
    name = type(hf).__name__
    if name not in BY_CLASS:
        raise TypeError(f"expected one of {', '.join(BY_CLASS)}, got {name}")
    fam = BY_CLASS[name]
    own = _OWN_CONVERSION.get(fam.model_type)
    return own.from_transformers(hf) if own else from_hf(fam, hf)


def hybrid_to_transformers(model: CausalLM, family: str, **overrides: Any) -> nn.Module:
    """The transformers LM of ``family`` equal to ``model``."""
    fam = family_of(family)
    own = _OWN_CONVERSION.get(fam.model_type)
    return own.to_transformers(model, overrides) if own else to_hf(fam, model, overrides)


def hybrid_config(model: CausalLM, family: str, **overrides: Any) -> Any:
    """The transformers config of ``family`` for ``model``."""
    return hf_config(family_of(family), model, overrides)


__all__ = ["FAMILIES", "detect_family", "family_of", "hybrid_config", "hybrid_from_transformers",
           "hybrid_to_transformers"]

"""The weight-mapping engine shared by the hybrid families.

A family describes (1) its ModelConfig translation both ways and (2) a layout: for each ssmkit block, the
transformers key of its pre-norm, the transformers prefix of its mixer and how a mixer parameter name is
renamed. The engine turns that into (ssmkit key, transformers key) pairs and copies tensors with every name and
shape checked: a transformers weight that nothing maps to, or an ssmkit weight with no source, is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...models.checkpoint import load_state
from ...models.config import ModelConfig
from ...models.heads import CausalLM

#: a transformers tensor, or the i-th of n equal row blocks of it: (key, i, n)
Key = tuple[str, int, int]


def fail(msg: str) -> ValueError:
    return ValueError(f"to_transformers: {msg}")


def unsupported(family: str, option: str, value: object, expected: str) -> ValueError:
    """The one-line error for a transformers config option ssmkit does not implement."""
    return ValueError(f"{family}: config option {option}={value!r} is not supported by ssmkit (expected {expected})")


@dataclass(frozen=True)
class Sub:
    """One ssmkit block in transformers' terms.

    kind: the ssmkit mixer name; norm: transformers key of the block's pre-norm weight; prefix: transformers
    prefix of the mixer's parameters; names: exact renames (ssmkit mixer key -> transformers key, or
    (transformers key, i, n): the i-th of n equal row blocks of that tensor, e.g. the gate half of a fused
    gate/up projection) and prefixes: leading renames (e.g. "mlp." -> "").
    """

    kind: str
    norm: str
    prefix: str
    names: dict[str, str | tuple[str, int, int]] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)

    def rename(self, key: str) -> Key:
        if key in self.names:
            v = self.names[key]
            return (f"{self.prefix}.{v}", 0, 1) if isinstance(v, str) else (f"{self.prefix}.{v[0]}", v[1], v[2])
        for a, b in self.prefixes.items():
            if key.startswith(a):
                return f"{self.prefix}.{b}{key[len(a):]}", 0, 1
        return f"{self.prefix}.{key}", 0, 1


def part(t: Tensor, key: Key) -> Tensor:
    """The row block of ``t`` that ``key`` (name, i, n) names (t itself for n == 1)."""
    _, i, n = key
    if n == 1:
        return t
    rows = t.shape[0] // n
    if rows * n != t.shape[0]:
        raise ValueError(f"{key[0]}: {t.shape[0]} rows do not split into {n} equal blocks")
    return t.narrow(0, i * rows, rows)


@dataclass(frozen=True)
class Family:
    """A transformers model family: its classes, key names, config translation and block layout."""

    name: str
    model_type: str
    hf_class: str
    config_class: str
    embed: str
    final_norm: str
    config_from_hf: Callable[[Any], ModelConfig]
    hf_fields: Callable[[CausalLM], dict[str, Any]]
    layout: Callable[[Any], list[Sub]]


def key_pairs(family: Family, hf_config: Any, model: CausalLM) -> list[tuple[str, Key]]:
    """(ssmkit key, transformers key) for every weight of ``model`` (tied lm_head excluded)."""
    layout = family.layout(hf_config)
    kinds = [s.kind for s in layout]
    if kinds != model.backbone.mixer_names:
        raise ValueError(f"{family.name}: the model's pattern {model.backbone.mixer_names} does not match the "
                         f"transformers layout {kinds}")
    pairs = [("backbone.embedding.weight", (family.embed, 0, 1)),
             ("backbone.final_norm.weight", (family.final_norm, 0, 1))]
    if not model.config.tie_embeddings:
        pairs.append(("lm_head.weight", ("lm_head.weight", 0, 1)))
    for j, (sub, block) in enumerate(zip(layout, model.backbone.blocks, strict=True)):
        pairs.append((f"backbone.blocks.{j}.norm.weight", (sub.norm, 0, 1)))
        pairs += [(f"backbone.blocks.{j}.mixer.{k}", sub.rename(k)) for k in block.mixer.state_dict()]
    return pairs


def _check_cover(family: Family, pairs: list[tuple[str, Key]], theirs: dict[str, Tensor], tied: bool) -> None:
    mapped = {t[0] for _, t in pairs}
    ignored = {"lm_head.weight"} if tied else set()
    missing = sorted(mapped - set(theirs))
    unmapped = sorted(set(theirs) - mapped - ignored)
    parts: dict[str, tuple[int, set[int]]] = {}
    for _, (k, i, n) in pairs:
        parts.setdefault(k, (n, set()))[1].add(i)
    unmapped += sorted(f"{k} (row blocks {sorted(got)} of {n})" for k, (n, got) in parts.items() if len(got) != n)
    if missing or unmapped:
        raise ValueError(f"{family.name}: weights do not map one to one -- not in transformers' model: "
                         f"{', '.join(missing) or 'none'}; not mapped: {', '.join(unmapped) or 'none'}")


def from_hf(family: Family, hf: nn.Module) -> CausalLM:
    """An ssmkit CausalLM computing the same function as the transformers model ``hf`` (same dtype, device)."""
    config = family.config_from_hf(hf.config)
    ref = hf.lm_head.weight
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG untouched
        model = CausalLM(config).to(device=ref.device, dtype=ref.dtype)
    pairs = key_pairs(family, hf.config, model)
    theirs = hf.state_dict()
    _check_cover(family, pairs, theirs, config.tie_embeddings)
    load_state(model, {o: part(theirs[t[0]], t).detach() for o, t in pairs}, where=f"transformers {type(hf).__name__}")
    return model.eval()


def hf_config(family: Family, model: CausalLM, overrides: dict[str, Any]) -> Any:
    """The transformers config of ``model``; ``overrides`` set fields the model does not determine."""
    import transformers

    derived = family.hf_fields(model)
    clash = sorted(set(overrides) & set(derived))
    if clash:
        raise fail(f"config_overrides cannot set {', '.join(clash)}: they are derived from the model")
    fields = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **derived, **overrides}
    return getattr(transformers, family.config_class)(**fields)


def to_hf(family: Family, model: CausalLM, overrides: dict[str, Any]) -> nn.Module:
    """A transformers model of ``family`` computing the same function as ``model`` (same dtype, device)."""
    import transformers

    cfg = hf_config(family, model, overrides)
    ref = model.lm_head.weight
    with torch.random.fork_rng(devices=[]):
        hf = getattr(transformers, family.hf_class)(cfg).to(device=ref.device, dtype=ref.dtype)
    try:
        pairs = key_pairs(family, cfg, model)
    except ValueError as e:
        raise fail(str(e)) from None
    theirs = hf.state_dict()
    _check_cover(family, pairs, theirs, cfg.tie_word_embeddings)
    ours = model.state_dict()
    with torch.no_grad():
        for o, t in pairs:
            dst = part(theirs[t[0]], t)
            if dst.shape != ours[o].shape:
                raise fail(f"{o} {tuple(ours[o].shape)} does not fit {t[0]} {tuple(dst.shape)}")
            dst.copy_(ours[o])
    if cfg.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr():
        raise RuntimeError(f"to_transformers: transformers did not tie {family.hf_class}'s lm_head")
    return hf.eval()


# ------------------------------------------------------------------------------------------- shared checks
def require(family: str, option: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise unsupported(family, option, value, " or ".join(map(repr, allowed)))


def int_ratio(family: str, what: str, num: int, den: int) -> int | float:
    """num / den as an int when exact (expand factors)."""
    r = num / den
    if r * den != num:
        raise ValueError(f"{family}: {what}={num} / {den} is not exact")
    return int(r) if r == int(r) else r


def single_kind(model: CausalLM, kinds: tuple[str, ...]) -> None:
    bad = sorted(set(model.backbone.mixer_names) - set(kinds))
    if bad:
        raise fail(f"mixers {bad} have no place in this family (allowed: {', '.join(kinds)})")


def common_checks(model: CausalLM, soft_cap: bool = False) -> ModelConfig:
    """The model-level settings every family needs: an exact CausalLM, rmsnorm, no block MLP, no dropout, and no
    logit soft cap unless the family has one (``soft_cap``)."""
    if type(model) is not CausalLM:
        raise TypeError(f"model must be an ssmkit CausalLM (exactly), got {type(model).__name__}")
    cfg = model.config
    if cfg.norm != "rmsnorm":
        raise fail(f"config.norm must be 'rmsnorm', got {cfg.norm!r}")
    if cfg.mlp != "none":
        raise fail(f"config.mlp must be 'none' (MLPs are 'ffn' / 'moe' blocks of the pattern), got {cfg.mlp!r}")
    if cfg.dropout != 0:
        raise fail(f"config.dropout must be 0, got {cfg.dropout}")
    if cfg.logits_soft_cap is not None and not soft_cap:
        raise fail(f"config.logits_soft_cap={cfg.logits_soft_cap}: this family has no logit soft cap")
    return cfg


def present(model: CausalLM, kind: str) -> bool:
    """The model has ``kind`` blocks or options for them (which the transformers config then records)."""
    return kind in model.backbone.mixer_names or kind in model.config.mixer_options


def layer_of(model: CausalLM, kind: str) -> nn.Module:
    """A mixer of ``kind`` as the model builds it: its first such block, else one built on the meta device from
    the config's options (families keep e.g. attention sizes in the config even without attention blocks)."""
    for name, block in zip(model.backbone.mixer_names, model.backbone.blocks, strict=True):
        if name == kind:
            return block.mixer
    from ...models.registry import build_mixer

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_mixer(kind, model.config.d_model, model.config.mixer_options)

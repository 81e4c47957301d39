"""Whole-model conversion between ssmkit's CausalLM and transformers' MambaForCausalLM / Mamba2ForCausalLM, and
(through :mod:`ssmkit.interop.hybrids`) the hybrid families FalconMamba, Bamba, NemotronH, Jamba, GraniteMoeHybrid,
FalconH1, Zamba2 and RecurrentGemma (docs/interop.md).

A transformers Mamba(2) LM is an ssmkit CausalLM with ``pattern`` all "mamba" (or all "mamba2"),
``norm="rmsnorm"``, ``mlp="none"``, no dropout; ``tie_embeddings`` follows ``tie_word_embeddings``. Parameters
map by name:

    backbone.embeddings.weight        <-> backbone.embedding.weight
    backbone.layers.{i}.norm.weight   <-> backbone.blocks.{i}.norm.weight
    backbone.layers.{i}.mixer.*       <-> backbone.blocks.{i}.mixer.*   (via :mod:`ssmkit.interop.mixers`)
    backbone.norm_f.weight            <-> backbone.final_norm.weight
    lm_head.weight                    <-> lm_head.weight (tied to the embedding when tie is set)

Directories are read with transformers' own ``from_pretrained(..., local_files_only=True)``: nothing is ever
fetched from the hub, and a path that is not an existing directory is an error, never a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2
from ..models.checkpoint import load_state
from ..models.config import ModelConfig
from ..models.heads import CausalLM
from . import hybrids
from .mixers import copy_mixer_to_transformers, mixer_from_transformers, transformers_mixer_fields

_HF_CLASSES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


# ------------------------------------------------------------------------------------------- transformers -> ssmkit
def _load_transformers_dir(directory: Path) -> nn.Module:
    """A MambaForCausalLM / Mamba2ForCausalLM from a directory written by transformers' save_pretrained."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (from_transformers reads local directories "
                                f"only, never the hub)")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing config.json (not a transformers save_pretrained directory?)")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a valid transformers config: {e}") from e
    classes = {**_HF_CLASSES, **{k: f.hf_class for k, f in hybrids.FAMILIES.items()}}
    if model_type not in classes:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not supported; expected one of "
                         f"{', '.join(map(repr, classes))}")
    import transformers

    cls = getattr(transformers, classes[model_type])
    return cls.from_pretrained(str(directory), local_files_only=True)


def _model_type(hf: object) -> str:
    name = type(hf).__name__
    for kind, cls_name in _HF_CLASSES.items():
        if name == cls_name:
            return kind
    raise TypeError(f"model_or_dir must be a transformers {' or '.join(_HF_CLASSES.values())} or a directory "
                    f"saved by one, got {name}")


def _mixer_options(kind: str, hf_cfg: Any) -> dict[str, Any]:
    """ssmkit mixer options equivalent to a transformers Mamba/Mamba2 config."""
    if hf_cfg.hidden_act not in ("silu", "swish"):
        raise ValueError(f"transformers config has hidden_act={hf_cfg.hidden_act!r}; ssmkit supports only 'silu'")
    common = dict(
        d_state=int(hf_cfg.state_size), d_conv=int(hf_cfg.conv_kernel), expand=hf_cfg.expand,
        dt_min=float(hf_cfg.time_step_min), dt_max=float(hf_cfg.time_step_max),
        dt_init_floor=float(hf_cfg.time_step_floor), conv_bias=bool(hf_cfg.use_conv_bias),
        bias=bool(hf_cfg.use_bias),
    )
    if kind == "mamba":
        return {**common, "dt_rank": int(hf_cfg.time_step_rank),
                "dt_scale": float(getattr(hf_cfg, "time_step_scale", 1.0))}
    lo, hi = hf_cfg.time_step_limit
    return {**common, "headdim": int(hf_cfg.head_dim), "ngroups": int(hf_cfg.n_groups),
            "chunk_size": int(hf_cfg.chunk_size), "dt_limit": (float(lo), float(hi)),
            "norm_eps": float(hf_cfg.layer_norm_epsilon), "dt_rank": int(hf_cfg.time_step_rank)}


def config_from_transformers(hf_config: Any) -> ModelConfig:
    """The ssmkit ModelConfig of a transformers MambaConfig / Mamba2Config."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in _HF_CLASSES:
        raise ValueError(f"hf_config.model_type must be one of {', '.join(map(repr, _HF_CLASSES))}, got {kind!r}")
    if kind == "mamba2":
        d_inner = hf_config.expand * hf_config.hidden_size
        if hf_config.num_heads * hf_config.head_dim != d_inner:
            raise ValueError(f"Mamba2Config has num_heads={hf_config.num_heads} * head_dim={hf_config.head_dim} "
                             f"!= expand * hidden_size = {d_inner}")
    return ModelConfig(
        d_model=int(hf_config.hidden_size), n_layers=int(hf_config.num_hidden_layers), pattern=kind,
        vocab_size=int(hf_config.vocab_size), mixer_options={kind: _mixer_options(kind, hf_config)},
        norm="rmsnorm", norm_eps=float(hf_config.layer_norm_epsilon), mlp="none",
        tie_embeddings=bool(hf_config.tie_word_embeddings), dropout=0.0,
        residual_in_fp32=bool(hf_config.residual_in_fp32),
    )


def from_transformers(model_or_dir: nn.Module | str | Path) -> CausalLM:
    """An ssmkit CausalLM computing the same function as a transformers MambaForCausalLM / Mamba2ForCausalLM
    (a model object, or a directory written by its ``save_pretrained``), in the same dtype and on the same device,
    in eval mode."""
    hf = _load_transformers_dir(Path(model_or_dir)) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    if type(hf).__name__ in hybrids.BY_CLASS:
        return hybrids.hybrid_from_transformers(hf)
    _model_type(hf)  # TypeError unless a MambaForCausalLM / Mamba2ForCausalLM
    config = config_from_transformers(hf.config)
    ref = hf.lm_head.weight
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG untouched
        model = CausalLM(config).to(device=ref.device, dtype=ref.dtype)
    src = hf.backbone
    tensors: dict[str, Tensor] = {"backbone.embedding.weight": src.embeddings.weight,
                                  "backbone.final_norm.weight": src.norm_f.weight}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = hf.lm_head.weight
    for i, block in enumerate(src.layers):
        tensors[f"backbone.blocks.{i}.norm.weight"] = block.norm.weight
        with torch.random.fork_rng(devices=[]):
            layer = mixer_from_transformers(block.mixer)
        tensors.update({f"backbone.blocks.{i}.mixer.{k}": v for k, v in layer.state_dict().items()})
    load_state(model, {k: v.detach() for k, v in tensors.items()}, where=f"transformers {type(hf).__name__}")
    return model.eval()


# ------------------------------------------------------------------------------------------- ssmkit -> transformers
def _fail(msg: str) -> ValueError:
    return ValueError(f"to_transformers: {msg}")


def transformers_config(model: CausalLM, **overrides: Any):
    """The transformers MambaConfig / Mamba2Config of an ssmkit CausalLM (see the module docstring for which
    models have one). ``overrides`` set the fields the model does not determine (e.g. eos_token_id; token ids
    default to None); setting a derived field (hidden_size, ...) is an error."""
    if type(model) is not CausalLM:
        raise TypeError(f"model must be an ssmkit CausalLM (exactly; prefix layers have no transformers "
                        f"equivalent), got {type(model).__name__}")
    cfg = model.config
    names = model.backbone.mixer_names
    kinds = sorted(set(names))
    if len(kinds) != 1 or kinds[0] not in _HF_CLASSES:
        raise _fail(f"model pattern must be all 'mamba' or all 'mamba2', got {names}; or pass family= one of "
                    f"{', '.join(map(repr, hybrids.FAMILIES))} to hear why that hybrid family does not fit")
    kind = kinds[0]
    if cfg.norm != "rmsnorm":
        raise _fail(f"config.norm must be 'rmsnorm', got {cfg.norm!r}")
    if cfg.mlp != "none":
        raise _fail(f"config.mlp must be 'none' (transformers' Mamba blocks have no MLP), got {cfg.mlp!r}")
    if cfg.dropout != 0:
        raise _fail(f"config.dropout must be 0 (transformers' Mamba blocks have no dropout), got {cfg.dropout}")
    if cfg.logits_soft_cap is not None:
        raise _fail(f"config.logits_soft_cap must be None (transformers' Mamba has no soft cap), "
                    f"got {cfg.logits_soft_cap}")
    first = model.backbone.blocks[0].mixer
    import transformers

    if kind == "mamba2" and first.norm.eps != cfg.norm_eps:
        raise _fail(f"the mamba2 gated norm eps ({first.norm.eps}) must equal config.norm_eps "
                    f"({cfg.norm_eps}): transformers uses one layer_norm_epsilon for both")
    try:
        mixer_fields = transformers_mixer_fields(first)
    except ValueError as e:
        raise _fail(str(e)) from None
    derived: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layers, layer_norm_epsilon=cfg.norm_eps,
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings, **mixer_fields,
    )
    clash = sorted(set(overrides) & set(derived))
    if clash:
        raise _fail(f"config_overrides cannot set {', '.join(clash)}: they are derived from the model")
    fields = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **derived, **overrides}
    cls = transformers.MambaConfig if kind == "mamba" else transformers.Mamba2Config
    return cls(**fields)


def _hybrid_family(model: CausalLM, family: str | None):
    """The hybrid family to convert to, or None for the plain Mamba / Mamba-2 path."""
    if family in (None, "mamba", "mamba2"):
        if family is None and isinstance(model, CausalLM) and not set(model.backbone.mixer_names) <= {"mamba",
                                                                                                      "mamba2"}:
            return hybrids.detect_family(model)  # None: the Mamba path then says what does not fit
        return None
    return hybrids.family_of(family)


def to_transformers(model: CausalLM | str | Path, family: str | None = None, **config_overrides: Any) -> nn.Module:
    """A transformers LM computing the same function as an ssmkit CausalLM (a model or a directory saved by
    ssmkit's ``save_pretrained``), in the same dtype and on the same device, in eval mode: MambaForCausalLM
    (all-"mamba" pattern), Mamba2ForCausalLM (all-"mamba2"), or the hybrid ``family`` ("falcon_mamba", "bamba",
    "nemotron_h", "jamba", "granitemoehybrid", "falcon_h1", "zamba2", "recurrent_gemma"; None = the one family
    that fits). ``config_overrides``
    go to the transformers config."""
    if isinstance(model, (str, Path)):
        from ..models.pretrained import load_pretrained

        model = load_pretrained(model)
    fam = _hybrid_family(model, family)
    if fam is not None:
        return hybrids.hybrid_to_transformers(model, fam.model_type, **config_overrides)
    hf_cfg = transformers_config(model, **config_overrides)
    import transformers

    cls = getattr(transformers, _HF_CLASSES[hf_cfg.model_type])
    ref = model.lm_head.weight
    with torch.random.fork_rng(devices=[]):
        hf = cls(hf_cfg).to(device=ref.device, dtype=ref.dtype)
    expected = Mamba if hf_cfg.model_type == "mamba" else Mamba2
    dst = hf.backbone
    with torch.no_grad():
        dst.embeddings.weight.copy_(model.backbone.embedding.weight)
        dst.norm_f.weight.copy_(model.backbone.final_norm.weight)
        if not hf_cfg.tie_word_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
        for i, (block, hf_block) in enumerate(zip(model.backbone.blocks, dst.layers, strict=True)):
            if type(block.mixer) is not expected:
                raise _fail(f"layer {i} is a {type(block.mixer).__name__}, expected {expected.__name__}")
            hf_block.norm.weight.copy_(block.norm.weight)
            copy_mixer_to_transformers(block.mixer, hf_block.mixer)
    if hf_cfg.tie_word_embeddings and hf.lm_head.weight.data_ptr() != dst.embeddings.weight.data_ptr():
        raise RuntimeError("to_transformers: transformers did not tie lm_head to the embeddings")
    return hf.eval()

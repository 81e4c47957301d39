"""One-to-one weight mapping between ssmkit's Mamba / Mamba2 and transformers' MambaMixer / Mamba2Mixer.

The parameter names and shapes are identical (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj for Mamba;
in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj for Mamba-2), so the mapping is a checked state-dict
copy. Hyperparameters are read off the mixer (its attributes and its ``config``).

    mixer_from_transformers(mixer) -> Mamba | Mamba2            a new ssmkit layer (copy of the weights)
    mixer_to_transformers(layer) -> MambaMixer | Mamba2Mixer    a new transformers mixer (imports transformers)
    copy_mixer_to_transformers(layer, mixer) -> mixer           in place: the layer's weights into an existing mixer

The old names (``mamba_from_transformers_mixer``, ``mamba2_from_transformers_mixer``,
``load_into_transformers_mixer``) still work with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..layers.mamba import Mamba
from ..layers.mamba2 import Mamba2


def _kind(mixer: object) -> str:
    name = type(mixer).__name__
    if not isinstance(mixer, nn.Module) or name not in ("MambaMixer", "Mamba2Mixer"):
        raise TypeError(f"mixer must be a transformers MambaMixer or Mamba2Mixer, got {name}")
    return name


def _require_silu(mixer: nn.Module) -> None:
    act = getattr(mixer, "activation", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{type(mixer).__name__} uses hidden_act={act!r}; ssmkit supports only 'silu'")


def _expand(mixer: nn.Module) -> int | float:
    ratio = mixer.intermediate_size / mixer.hidden_size
    return int(ratio) if ratio == int(ratio) else ratio


def _mamba_kwargs(mixer: nn.Module) -> dict:
    """Mamba constructor arguments equivalent to a MambaMixer."""
    _require_silu(mixer)
    cfg = mixer.config
    return dict(
        d_model=int(mixer.hidden_size), d_state=int(mixer.ssm_state_size), d_conv=int(mixer.conv_kernel_size),
        expand=_expand(mixer), dt_rank=int(mixer.time_step_rank), dt_min=float(cfg.time_step_min),
        dt_max=float(cfg.time_step_max), dt_init_floor=float(cfg.time_step_floor),
        dt_scale=float(getattr(cfg, "time_step_scale", 1.0)), conv_bias=mixer.conv1d.bias is not None,
        bias=mixer.in_proj.bias is not None,
    )


def _mamba2_kwargs(mixer: nn.Module) -> dict:
    """Mamba2 constructor arguments equivalent to a Mamba2Mixer."""
    _require_silu(mixer)
    if mixer.num_heads * mixer.head_dim != mixer.intermediate_size:
        raise ValueError(f"Mamba2Mixer has num_heads={mixer.num_heads} * head_dim={mixer.head_dim} != "
                         f"intermediate_size={mixer.intermediate_size}")
    if mixer.norm.group_size * mixer.n_groups != mixer.intermediate_size:
        raise ValueError(f"Mamba2Mixer's norm has group_size={mixer.norm.group_size}; expected "
                         f"intermediate_size / n_groups = {mixer.intermediate_size // mixer.n_groups}")
    lo, hi = mixer.time_step_limit
    return dict(
        d_model=int(mixer.hidden_size), d_state=int(mixer.ssm_state_size), d_conv=int(mixer.conv_kernel_size),
        expand=_expand(mixer), headdim=int(mixer.head_dim), ngroups=int(mixer.n_groups),
        chunk_size=int(mixer.chunk_size), dt_min=float(mixer.time_step_min),
        dt_max=float(mixer.time_step_max), dt_init_floor=float(mixer.time_step_floor),
        dt_limit=(float(lo), float(hi)),
        conv_bias=mixer.conv1d.bias is not None, bias=mixer.in_proj.bias is not None,
        norm_eps=float(mixer.norm.variance_epsilon), dt_rank=int(mixer.time_step_rank),
    )


def _copy_state_dict(src: dict[str, Tensor], dst: nn.Module, what: str) -> None:
    """Copy ``src`` into ``dst`` after checking names and shapes match exactly; the error lists mismatches."""
    want = dst.state_dict()
    missing = sorted(set(want) - set(src))
    unexpected = sorted(set(src) - set(want))
    shapes = [f"{k}: {tuple(src[k].shape)} vs {tuple(want[k].shape)}"
              for k in sorted(set(src) & set(want)) if src[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in source: {', '.join(missing)}")
        if unexpected:
            parts.append(f"not in target: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch (source vs target): {'; '.join(shapes)}")
        raise ValueError(f"{what}: state dicts do not map one to one -- " + " | ".join(parts))
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(src[k])


def _layer_from_mixer(cls: type, kwargs: dict, mixer: nn.Module) -> nn.Module:
    ref = mixer.in_proj.weight
    layer = cls(**kwargs).to(device=ref.device, dtype=ref.dtype)
    _copy_state_dict(mixer.state_dict(), layer, f"{type(mixer).__name__} -> {cls.__name__}")
    return layer


_LAYERS = {"MambaMixer": (Mamba, _mamba_kwargs), "Mamba2Mixer": (Mamba2, _mamba2_kwargs)}


def mixer_from_transformers(mixer: nn.Module) -> Mamba | Mamba2:
    """A :class:`~ssmkit.layers.Mamba` (from a transformers ``MambaMixer``) or :class:`~ssmkit.layers.Mamba2`
    (from a ``Mamba2Mixer``) computing the same function: the mixer's hyperparameters and a copy of its weights,
    in the dtype/device of its in_proj."""
    cls, kwargs = _LAYERS[_kind(mixer)]
    return _layer_from_mixer(cls, kwargs(mixer), mixer)


_FUNCTIONAL = {  # hyperparameters that change the function (weights shapes alone do not pin them down)
    "MambaMixer": ("d_model", "d_state", "d_conv", "d_inner", "dt_rank"),
    "Mamba2Mixer": ("d_model", "d_state", "d_conv", "d_inner", "headdim", "ngroups", "dt_limit", "norm_eps"),
}


def copy_mixer_to_transformers(layer: Mamba | Mamba2, mixer: nn.Module) -> nn.Module:
    """In place: copy a Mamba (into a ``MambaMixer``) or Mamba2 (into a ``Mamba2Mixer``) layer's weights into
    the existing ``mixer``. Returns the mixer.

    Raises ValueError listing every mismatched hyperparameter or parameter name/shape.
    """
    kind = _kind(mixer)
    expected_cls = Mamba if kind == "MambaMixer" else Mamba2
    if type(layer) is not expected_cls:
        raise TypeError(f"layer must be a {expected_cls.__name__} to load into a {kind}, "
                        f"got {type(layer).__name__}")
    if layer.reverse:
        raise ValueError(f"layer has reverse=True; a transformers {kind} is causal only")
    _check_plain(layer)
    kwargs = _mamba_kwargs(mixer) if kind == "MambaMixer" else _mamba2_kwargs(mixer)
    kwargs["d_inner"] = int(mixer.intermediate_size)
    ours = {"norm_eps": layer.norm.eps} if kind == "Mamba2Mixer" else {}
    bad = [f"{k}: layer {ours.get(k, getattr(layer, k, None))!r} vs mixer {kwargs[k]!r}"
           for k in _FUNCTIONAL[kind] if ours.get(k, getattr(layer, k, None)) != kwargs[k]]
    if bad:
        raise ValueError(f"{type(layer).__name__} -> {kind}: hyperparameters differ -- " + "; ".join(bad))
    _copy_state_dict(layer.state_dict(), mixer, f"{type(layer).__name__} -> {kind}")
    return mixer


def _check_plain(layer: nn.Module) -> None:
    if getattr(layer, "variant", False):
        raise ValueError(f"Mamba with out_norm={layer.out_norm}, dt_source={layer.dt_source!r} has no transformers "
                         f"MambaMixer equivalent")


def transformers_mixer_fields(layer: Mamba | Mamba2) -> dict:
    """The transformers MambaConfig / Mamba2Config fields that a Mamba / Mamba2 layer determines (all but the
    model-level ones: vocab_size, num_hidden_layers, layer_norm_epsilon, ...)."""
    if type(layer) not in (Mamba, Mamba2):
        raise TypeError(f"layer must be an ssmkit Mamba or Mamba2, got {type(layer).__name__}")
    _check_plain(layer)
    expand = layer.d_inner // layer.d_model
    if expand * layer.d_model != layer.d_inner:
        raise ValueError(f"{type(layer).__name__}: d_inner={layer.d_inner} is not an integer multiple of "
                         f"d_model={layer.d_model} (transformers' expand is an int)")
    fields = dict(
        hidden_size=layer.d_model, state_size=layer.d_state, conv_kernel=layer.d_conv, expand=expand,
        use_conv_bias=layer.conv1d.bias is not None, use_bias=layer.in_proj.bias is not None, hidden_act="silu",
        time_step_min=layer.dt_min, time_step_max=layer.dt_max, time_step_floor=layer.dt_init_floor,
    )
    if type(layer) is Mamba:
        return {**fields, "time_step_rank": layer.dt_rank, "time_step_scale": layer.dt_scale}
    fields.update(num_heads=layer.nheads, head_dim=layer.headdim, n_groups=layer.ngroups,
                  chunk_size=layer.chunk_size, time_step_limit=tuple(layer.dt_limit))
    if layer.dt_rank is not None:  # unused by Mamba-2's math; kept so that the config round-trips
        fields["time_step_rank"] = layer.dt_rank
    return fields


def mixer_to_transformers(layer: Mamba | Mamba2) -> nn.Module:
    """A new transformers ``MambaMixer`` (from a Mamba) or ``Mamba2Mixer`` (from a Mamba2) computing the same
    function as ``layer``, in its dtype and on its device, in eval mode (layer_idx 0)."""
    fields = transformers_mixer_fields(layer)
    import transformers

    if type(layer) is Mamba:
        from transformers.models.mamba.modeling_mamba import MambaMixer as cls

        config = transformers.MambaConfig(**fields)
    else:
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as cls

        config = transformers.Mamba2Config(layer_norm_epsilon=layer.norm.eps, **fields)
    ref = layer.in_proj.weight
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global RNG untouched
        mixer = cls(config, layer_idx=0).to(device=ref.device, dtype=ref.dtype)
    return copy_mixer_to_transformers(layer, mixer).eval()


# ------------------------------------------------------------------------------------------- deprecated names
def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"ssmkit.interop.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def mamba_from_transformers_mixer(mixer: nn.Module) -> Mamba:
    """Deprecated: :func:`mixer_from_transformers` (this one accepts only a ``MambaMixer``)."""
    _deprecated("mamba_from_transformers_mixer", "mixer_from_transformers")
    if _kind(mixer) != "MambaMixer":
        raise TypeError(f"mixer must be a transformers MambaMixer, got {type(mixer).__name__}")
    return mixer_from_transformers(mixer)


def mamba2_from_transformers_mixer(mixer: nn.Module) -> Mamba2:
    """Deprecated: :func:`mixer_from_transformers` (this one accepts only a ``Mamba2Mixer``)."""
    _deprecated("mamba2_from_transformers_mixer", "mixer_from_transformers")
    if _kind(mixer) != "Mamba2Mixer":
        raise TypeError(f"mixer must be a transformers Mamba2Mixer, got {type(mixer).__name__}")
    return mixer_from_transformers(mixer)


def load_into_transformers_mixer(layer: Mamba | Mamba2, mixer: nn.Module) -> nn.Module:
    """Deprecated: :func:`copy_mixer_to_transformers` (same arguments, in place)."""
    _deprecated("load_into_transformers_mixer", "copy_mixer_to_transformers")
    return copy_mixer_to_transformers(layer, mixer)

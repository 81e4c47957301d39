"""FalconMamba (``FalconMambaForCausalLM``): Mamba blocks whose dt, B and C are RMS-normalised (weightless).

ssmkit form: pattern ``normed-mamba`` * n_layers (``bcdt_weights=False``, ``bcdt_eps`` = mixer_rms_eps),
rmsnorm pre-norms, no MLP. Keys: ``backbone.embeddings``, ``backbone.layers.{i}.norm`` / ``.mixer.*`` (the
Mamba names), ``backbone.norm_f``.
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .engine import Family, Sub, common_checks, fail, int_ratio, layer_of, require, single_kind

NAME = "FalconMamba"


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, ("silu", "swish"))
    opts = dict(
        d_state=int(c.state_size), d_conv=int(c.conv_kernel),
        expand=int_ratio(NAME, "intermediate_size", int(c.intermediate_size), int(c.hidden_size)),
        dt_rank=int(c.time_step_rank), dt_min=float(c.time_step_min), dt_max=float(c.time_step_max),
        dt_init_floor=float(c.time_step_floor), dt_scale=float(c.time_step_scale),
        conv_bias=bool(c.use_conv_bias), bias=bool(c.use_bias), bcdt_eps=float(c.mixer_rms_eps), bcdt_weights=False,
    )
    return ModelConfig(
        d_model=int(c.hidden_size), pattern="normed-mamba", n_layers=int(c.num_hidden_layers),
        vocab_size=int(c.vocab_size), mixer_options={"normed-mamba": opts}, norm="rmsnorm",
        norm_eps=float(c.layer_norm_epsilon), mlp="none", tie_embeddings=bool(c.tie_word_embeddings),
        residual_in_fp32=bool(c.residual_in_fp32),
    )


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    single_kind(model, ("normed-mamba",))
    m = layer_of(model, "normed-mamba")
    if m.bcdt_weights:
        raise fail("FalconMamba's dt/B/C norms have no weights; this model has bcdt_weights=True (that is Jamba)")
    if m.reverse:
        raise fail("normed-mamba has reverse=True; FalconMamba is causal")
    expand = m.d_inner // m.d_model
    if expand * m.d_model != m.d_inner:
        raise fail(f"d_inner={m.d_inner} is not an integer multiple of d_model={m.d_model}")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings, state_size=m.d_state, conv_kernel=m.d_conv, expand=expand,
        time_step_rank=m.dt_rank, time_step_scale=m.dt_scale, time_step_min=m.dt_min, time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor, use_conv_bias=m.conv1d.bias is not None,
        use_bias=m.in_proj.bias is not None, hidden_act="silu", mixer_rms_eps=m.bcdt_eps,
    )


def layout(c: Any) -> list[Sub]:
    return [Sub("normed-mamba", f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.mixer")
            for i in range(int(c.num_hidden_layers))]


FAMILY = Family(NAME, "falcon_mamba", "FalconMambaForCausalLM", "FalconMambaConfig", "backbone.embeddings.weight",
                "backbone.norm_f.weight", config_from_hf, hf_fields, layout)

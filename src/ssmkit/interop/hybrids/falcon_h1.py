"""FalconH1 (``FalconH1ForCausalLM``): every layer runs a Mamba-2 and a rotary GQA attention side by side on the
same normed input, then a SwiGLU MLP, with muP multipliers throughout.

ssmkit form: two blocks per layer, ``parallel-h1`` (:class:`~ssmkit.layers.falcon_h1.ParallelHybrid`, weights
``mamba.*`` and ``self_attn.*`` under transformers' layer prefix) then ``ffn`` (gate/down multipliers);
ModelConfig's embedding_multiplier, and logits_scaling = 1 / lm_head_multiplier.
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .bamba import paired_layers, rope
from .engine import Family, Sub, common_checks, fail, layer_of, require, unsupported

NAME = "FalconH1"


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, ("silu", "swish"))
    if bool(c.mamba_proj_bias) != bool(c.projectors_bias):
        raise unsupported(NAME, "projectors_bias", c.projectors_bias, f"equal to mamba_proj_bias={c.mamba_proj_bias}")
    head_dim = int(getattr(c, "head_dim", None) or int(c.hidden_size) // int(c.num_attention_heads))
    rot, base = rope(NAME, c, head_dim)
    d_ssm = int(c.mamba_d_ssm) if c.mamba_d_ssm is not None else int(c.mamba_expand * c.hidden_size)
    if int(c.mamba_n_heads) * int(c.mamba_d_head) != d_ssm:
        raise unsupported(NAME, "mamba_n_heads * mamba_d_head", int(c.mamba_n_heads) * int(c.mamba_d_head),
                          f"mamba_d_ssm = {d_ssm}")
    expand = d_ssm / int(c.hidden_size)
    lo, hi = c.time_step_limit
    par = dict(
        n_heads=int(c.num_attention_heads), n_kv_heads=int(c.num_key_value_heads), head_dim=head_dim,
        rotary_dim=rot, rotary_base=base, key_multiplier=float(c.key_multiplier), attn_bias=bool(c.attention_bias),
        d_state=int(c.mamba_d_state), d_conv=int(c.mamba_d_conv),
        expand=int(expand) if expand == int(expand) else expand,
        headdim=int(c.mamba_d_head), ngroups=int(c.mamba_n_groups), chunk_size=int(c.mamba_chunk_size),
        dt_limit=(float(lo), float(hi)), conv_bias=bool(c.mamba_conv_bias), bias=bool(c.mamba_proj_bias),
        norm_eps=float(c.rms_norm_eps), ssm_rms_norm=bool(c.mamba_rms_norm),
        norm_before_gate=bool(c.mamba_norm_before_gate), ssm_multipliers=tuple(float(m) for m in c.ssm_multipliers),
        ssm_in_multiplier=float(c.ssm_in_multiplier), ssm_out_multiplier=float(c.ssm_out_multiplier),
        attn_in_multiplier=float(c.attention_in_multiplier), attn_out_multiplier=float(c.attention_out_multiplier))
    gm, dm = (float(m) for m in c.mlp_multipliers)
    ffn = dict(d_hidden=int(c.intermediate_size), act="silu", gated=True, bias=bool(c.mlp_bias), gate_multiplier=gm,
               down_multiplier=dm)
    return ModelConfig(d_model=int(c.hidden_size), pattern=["parallel-h1", "ffn"] * int(c.num_hidden_layers),
                       vocab_size=int(c.vocab_size), mixer_options={"parallel-h1": par, "ffn": ffn}, norm="rmsnorm",
                       norm_eps=float(c.rms_norm_eps), mlp="none", tie_embeddings=bool(c.tie_word_embeddings),
                       residual_in_fp32=False, embedding_multiplier=float(c.embedding_multiplier),
                       logits_scaling=1.0 / float(c.lm_head_multiplier))


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    kinds = paired_layers(model, ("parallel-h1",), ("ffn",))
    if cfg.residual_multiplier != 1.0:
        raise fail(f"FalconH1 has no residual multiplier, got config.residual_multiplier={cfg.residual_multiplier}")
    p, f = layer_of(model, "parallel-h1"), layer_of(model, "ffn")
    m, a = p.mamba, p.self_attn
    if m.reverse or m.norm.eps != cfg.norm_eps:
        raise fail(f"FalconH1's mamba is causal and its norm eps equals config.norm_eps ({cfg.norm_eps})")
    if a.scale is not None or a.rotary_dim != a.head_dim or (a.q_proj.bias is None) != (a.o_proj.bias is None):
        raise fail("FalconH1 attention uses head_dim ** -0.5, rotary on the whole head and one attention_bias")
    if (f.act, f.gated) != ("silu", True):
        raise fail(f"FalconH1's MLP is gated silu, got act={f.act!r}, gated={f.gated}")
    lo, hi = m.dt_limit
    di = m.d_inner
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(kinds), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", embedding_multiplier=cfg.embedding_multiplier,
        lm_head_multiplier=1.0 / cfg.logits_scaling,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": a.rotary_base}, key_multiplier=a.key_multiplier,
        attention_bias=a.q_proj.bias is not None, mamba_d_ssm=di, mamba_n_heads=m.nheads, mamba_d_head=m.headdim,
        mamba_n_groups=m.ngroups, mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None,
        projectors_bias=m.out_proj.bias is not None, time_step_limit=(lo, hi),
        mamba_rms_norm=m.norm.weight is not None, mamba_norm_before_gate=m.norm.before,
        ssm_multipliers=list(m.ssm_multipliers), ssm_in_multiplier=m.in_proj.in_multiplier,
        ssm_out_multiplier=p.ssm_out_multiplier, attention_in_multiplier=p.attn_in_multiplier,
        attention_out_multiplier=p.attn_out_multiplier, intermediate_size=f.d_hidden,
        mlp_bias=f.mlp.up_proj.bias is not None,
        mlp_multipliers=[f.mlp.gate_multiplier, f.mlp.down_multiplier],
    )


def layout(c: Any) -> list[Sub]:
    out = []
    for i in range(int(c.num_hidden_layers)):
        p = f"model.layers.{i}"
        out.append(Sub("parallel-h1", f"{p}.input_layernorm.weight", p))
        out.append(Sub("ffn", f"{p}.pre_ff_layernorm.weight", f"{p}.feed_forward", prefixes={"mlp.": ""}))
    return out


FAMILY = Family(NAME, "falcon_h1", "FalconH1ForCausalLM", "FalconH1Config", "model.embed_tokens.weight",
                "model.final_layernorm.weight", config_from_hf, hf_fields, layout)

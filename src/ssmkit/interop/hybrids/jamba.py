"""Jamba (``JambaForCausalLM``): Mamba layers with RMS-normed (weighted) dt/B/C and GQA attention layers without
positions, each followed by a SwiGLU MLP or a softmax-routed top-k MoE of SwiGLU experts.

ssmkit form: every transformers layer is two blocks, ``normed-mamba`` (``bcdt_weights=True``) or ``gqa``, then
``ffn`` or ``moe``. Attention sits at layers i with i % attn_layer_period == attn_layer_offset, experts at
i % expert_layer_period == expert_layer_offset; to_transformers picks the smallest (period, offset) that
reproduces the model's pattern.
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .bamba import gqa_layer, paired_layers
from .engine import Family, Sub, common_checks, fail, int_ratio, layer_of, present, require

NAME = "Jamba"


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, ("silu", "swish"))
    pattern = []
    for t, n in zip(c.layers_block_type, c.layers_num_experts, strict=True):
        pattern += ["gqa" if t == "attention" else "normed-mamba", "moe" if n > 1 else "ffn"]
    d_ff = int(c.intermediate_size)
    opts = {
        "normed-mamba": dict(d_state=int(c.mamba_d_state), d_conv=int(c.mamba_d_conv),
                             expand=int(c.mamba_expand), dt_rank=int(c.mamba_dt_rank),
                             conv_bias=bool(c.mamba_conv_bias), bias=bool(c.mamba_proj_bias),
                             bcdt_eps=float(c.rms_norm_eps), bcdt_weights=True),
        "gqa": dict(n_heads=int(c.num_attention_heads), n_kv_heads=int(c.num_key_value_heads),
                    head_dim=int(c.hidden_size) // int(c.num_attention_heads)),
        "ffn": dict(d_hidden=d_ff, act="silu", gated=True),
    }
    if int(c.num_experts) > 1:
        opts["moe"] = dict(d_hidden=d_ff, n_experts=int(c.num_experts), top_k=int(c.num_experts_per_tok),
                           router="softmax", norm_topk=False, act="silu", gated=True)
    return ModelConfig(d_model=int(c.hidden_size), pattern=pattern, vocab_size=int(c.vocab_size),
                       mixer_options=opts, norm="rmsnorm", norm_eps=float(c.rms_norm_eps), mlp="none",
                       tie_embeddings=bool(c.tie_word_embeddings), residual_in_fp32=False)


def period_offset(flags: list[bool], what: str) -> tuple[int, int]:
    """The smallest (period, offset) with flags[i] == (i % period == offset) for every layer."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    raise fail(f"the {what} layers {[i for i, f in enumerate(flags) if f]} are not periodic, as Jamba needs")


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    kinds = paired_layers(model, ("normed-mamba", "gqa"), ("ffn", "moe"))
    mlps = model.backbone.mixer_names[1::2]
    ap, ao = period_offset([k == "gqa" for k in kinds], "attention")
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(kinds), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attn_layer_period=ap, attn_layer_offset=ao)
    if present(model, "normed-mamba"):
        m = layer_of(model, "normed-mamba")
        if not m.bcdt_weights or m.bcdt_eps != cfg.norm_eps or m.reverse:
            raise fail(f"Jamba's mamba needs bcdt_weights=True, bcdt_eps == norm_eps ({cfg.norm_eps}) and no reverse;"
                       f" got bcdt_weights={m.bcdt_weights}, bcdt_eps={m.bcdt_eps}, reverse={m.reverse}")
        fields.update(mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_dt_rank=m.dt_rank,
                      mamba_expand=int_ratio(NAME, "mamba d_inner", m.d_inner, cfg.d_model),
                      mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None)
    if present(model, "gqa"):
        a = gqa_layer(model)
        if a.rotary_dim or a.q_proj.bias is not None or a.head_dim * a.n_heads != cfg.d_model:
            raise fail(f"Jamba attention has no rotary embedding, no biases and head_dim = d_model / n_heads; gqa "
                       f"has rotary_dim={a.rotary_dim}, biases={a.q_proj.bias is not None}, head_dim={a.head_dim}")
        fields.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads)
    f = layer_of(model, "ffn")
    if (f.act, f.gated, f.mlp.up_proj.bias is not None) != ("silu", True, False):
        raise fail(f"Jamba MLPs are gated silu without biases; ffn has act={f.act!r}, gated={f.gated}")
    fields["intermediate_size"] = f.d_hidden
    if present(model, "moe"):
        e = layer_of(model, "moe")
        if (e.router_kind, e.norm_topk, e.scaling, e.act, e.gated, e.d_shared, e.d_hidden) != (
                "softmax", False, 1.0, "silu", True, 0, f.d_hidden):
            raise fail("Jamba MoE is router='softmax' without renormalisation or scaling, gated silu experts of the "
                       "ffn's width and no shared expert")
        ep, eo = period_offset([k == "moe" for k in mlps], "expert")
        fields.update(num_experts=e.n_experts, num_experts_per_tok=e.top_k, expert_layer_period=ep,
                      expert_layer_offset=eo)
    else:  # dense: transformers' expert period and offset are then unused
        fields["num_experts"] = 1
    return fields


MOE_NAMES = {"w_in": "experts.gate_up_proj", "w_out": "experts.down_proj"}
NORM_NAMES = {"dt_layernorm": "dt_layernorm.weight", "b_layernorm": "b_layernorm.weight",
              "c_layernorm": "c_layernorm.weight"}


def layout(c: Any) -> list[Sub]:
    out = []
    for i, (t, n) in enumerate(zip(c.layers_block_type, c.layers_num_experts, strict=True)):
        p = f"model.layers.{i}"
        attn = t == "attention"
        out.append(Sub("gqa" if attn else "normed-mamba", f"{p}.input_layernorm.weight",
                       f"{p}.self_attn" if attn else f"{p}.mamba", names={} if attn else NORM_NAMES))
        out.append(Sub("moe" if n > 1 else "ffn", f"{p}.pre_ff_layernorm.weight", f"{p}.feed_forward",
                       names=MOE_NAMES if n > 1 else {}, prefixes={"mlp.": ""}))
    return out


FAMILY = Family(NAME, "jamba", "JambaForCausalLM", "JambaConfig", "model.embed_tokens.weight",
                "model.final_layernorm.weight", config_from_hf, hf_fields, layout)

"""GraniteMoeHybrid (``GraniteMoeHybridForCausalLM``): Mamba-2 or GQA attention layers (rotary or no positions,
softmax scale ``attention_multiplier``), each followed by a top-k MoE (top-k logits, then a softmax) plus an
always-on SwiGLU shared MLP, or by the shared MLP alone (``num_local_experts=0``); muP multipliers on the
embedding, on every residual branch and on the logits.

ssmkit form: two blocks per layer, ``mamba2`` / ``gqa`` then ``moe`` (router "topk_softmax", shared expert) or
``ffn``; ModelConfig's embedding_multiplier, residual_multiplier and logits_scaling. The shared MLP's fused
``input_linear`` (gate rows, then up rows) maps to the gate_proj / up_proj halves.
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .bamba import gqa_layer, mamba2_fields, mamba2_options, paired_layers, rope
from .engine import Family, Sub, common_checks, fail, int_ratio, layer_of, present, require

NAME = "GraniteMoeHybrid"


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, ("silu", "swish"))
    require(NAME, "position_embedding_type", c.position_embedding_type, (None, "rope"))
    head_dim = int(c.hidden_size) // int(c.num_attention_heads)
    rot, base = rope(NAME, c, head_dim) if c.position_embedding_type == "rope" else (0, 10000.0)
    moe = int(c.num_local_experts) > 0
    pattern = []
    for t in c.layers_block_type:
        pattern += ["gqa" if t == "full_attention" else "mamba2", "moe" if moe else "ffn"]
    opts = {
        "mamba2": mamba2_options(NAME, c, heads=c.mamba_n_heads, head_dim=c.mamba_d_head, groups=c.mamba_n_groups,
                                 d_state=c.mamba_d_state, d_conv=c.mamba_d_conv, chunk=c.mamba_chunk_size,
                                 conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, eps=c.rms_norm_eps),
        "gqa": dict(n_heads=int(c.num_attention_heads), n_kv_heads=int(c.num_key_value_heads), head_dim=head_dim,
                    rotary_dim=rot, rotary_base=base, scale=float(c.attention_multiplier),
                    qkv_bias=bool(c.attention_bias), out_bias=bool(c.attention_bias)),
    }
    shared = int(c.shared_intermediate_size)
    if moe:
        opts["moe"] = dict(d_hidden=int(c.intermediate_size), n_experts=int(c.num_local_experts),
                           top_k=int(c.num_experts_per_tok), router="topk_softmax", act="silu", gated=True,
                           d_shared=shared)
    else:
        opts["ffn"] = dict(d_hidden=shared, act="silu", gated=True)
    return ModelConfig(d_model=int(c.hidden_size), pattern=pattern, vocab_size=int(c.vocab_size), mixer_options=opts,
                       norm="rmsnorm", norm_eps=float(c.rms_norm_eps), mlp="none",
                       tie_embeddings=bool(c.tie_word_embeddings), residual_in_fp32=False,
                       embedding_multiplier=float(c.embedding_multiplier),
                       residual_multiplier=float(c.residual_multiplier), logits_scaling=float(c.logits_scaling))


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    kinds = paired_layers(model, ("mamba2", "gqa"), ("moe", "ffn"))
    mlps = set(model.backbone.mixer_names[1::2])
    if len(mlps) != 1:
        raise fail(f"GraniteMoeHybrid layers are all MoE or all dense, got MLP blocks {sorted(mlps)}")
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(kinds),
        layer_types=["full_attention" if k == "gqa" else "linear_attention" for k in kinds], rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", embedding_multiplier=cfg.embedding_multiplier,
        residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling)
    if present(model, "mamba2"):
        m = mamba2_fields(model, "rms_norm_eps")
        fields.update(
            mamba_n_heads=m["heads"], mamba_d_head=m["head_dim"], mamba_n_groups=m["groups"],
            mamba_d_state=m["d_state"], mamba_d_conv=m["d_conv"], mamba_chunk_size=m["chunk"],
            mamba_expand=int_ratio(NAME, "mamba d_inner", m["heads"] * m["head_dim"], cfg.d_model),
            mamba_conv_bias=m["conv_bias"], mamba_proj_bias=m["bias"], time_step_limit=m["limit"])
    if present(model, "gqa"):
        a = gqa_layer(model, any_scale=True)
        if a.head_dim * a.n_heads != cfg.d_model or a.rotary_dim not in (0, a.head_dim):
            raise fail(f"GraniteMoeHybrid attention has head_dim = d_model / n_heads and rotary on the whole head "
                       f"or none, got head_dim={a.head_dim}, n_heads={a.n_heads}, rotary_dim={a.rotary_dim}")
        fields.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      attention_bias=a.q_proj.bias is not None, attention_multiplier=a.head_dim ** -0.5
                      if a.scale is None else a.scale,
                      position_embedding_type="rope" if a.rotary_dim else None)
        if a.rotary_dim:
            fields["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rotary_base}
    if "moe" in mlps:
        e = layer_of(model, "moe")
        if (e.router_kind, e.norm_topk, e.scaling, e.act, e.gated) != ("topk_softmax", False, 1.0, "silu", True) \
                or e.d_shared == 0 or e.shared.up_proj.bias is not None:
            raise fail("GraniteMoeHybrid MoE is router='topk_softmax' (no renormalisation, no scaling), gated silu "
                       "experts and a bias-free shared expert")
        fields.update(intermediate_size=e.d_hidden, num_local_experts=e.n_experts, num_experts_per_tok=e.top_k,
                      shared_intermediate_size=e.d_shared)
    else:
        f = layer_of(model, "ffn")
        if (f.act, f.gated, f.mlp.up_proj.bias is not None) != ("silu", True, False):
            raise fail(f"GraniteMoeHybrid's shared MLP is gated silu without biases; ffn has act={f.act!r}, "
                       f"gated={f.gated}")
        fields.update(num_local_experts=0, shared_intermediate_size=f.d_hidden)
    return fields


SHARED = {"gate_proj.weight": ("shared_mlp.input_linear.weight", 0, 2),
          "up_proj.weight": ("shared_mlp.input_linear.weight", 1, 2),
          "down_proj.weight": "shared_mlp.output_linear.weight"}
MOE_NAMES = {"router.weight": "block_sparse_moe.router.weight", "w_in": "block_sparse_moe.experts.gate_up_proj",
             "w_out": "block_sparse_moe.experts.down_proj", **{f"shared.{k}": v for k, v in SHARED.items()}}
FFN_NAMES = {f"mlp.{k}": v for k, v in SHARED.items()}


def layout(c: Any) -> list[Sub]:
    moe = int(c.num_local_experts) > 0
    out = []
    for i, t in enumerate(c.layers_block_type):
        p = f"model.layers.{i}"
        attn = t == "full_attention"
        out.append(Sub("gqa" if attn else "mamba2", f"{p}.input_layernorm.weight",
                       f"{p}.self_attn" if attn else f"{p}.mamba"))
        out.append(Sub("moe" if moe else "ffn", f"{p}.post_attention_layernorm.weight", p,
                       names=MOE_NAMES if moe else FFN_NAMES))
    return out


FAMILY = Family(NAME, "granitemoehybrid", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
                "model.embed_tokens.weight", "model.norm.weight", config_from_hf, hf_fields, layout)

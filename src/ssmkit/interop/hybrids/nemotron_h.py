"""NemotronH (``NemotronHForCausalLM``): one pre-norm residual block per layer, each a Mamba-2 mixer
("linear_attention"), GQA attention without positions ("full_attention"), a plain (ungated) MLP ("mlp") or a
sigmoid-routed MoE with a shared expert ("moe").

ssmkit form: one block per layer, ``mamba2`` / ``gqa`` / ``ffn`` / ``moe``. Keys: ``model.embeddings``,
``model.layers.{i}.norm`` / ``.mixer.*``, ``model.norm_f``. transformers never ties NemotronH's lm_head
(whatever tie_word_embeddings says), so the ssmkit model is untied. transformers' NemotronH attention has no
biases and ignores ``attention_bias`` and ``sliding_window``; so does the conversion (it reproduces transformers).
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .bamba import gqa_layer, mamba2_fields, mamba2_options
from .engine import Family, Sub, common_checks, fail, layer_of, present, require, unsupported

NAME = "NemotronH"
KINDS = {"linear_attention": "mamba2", "full_attention": "gqa", "mlp": "ffn", "moe": "moe"}


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "mamba_hidden_act", c.mamba_hidden_act, ("silu", "swish"))
    if c.moe_latent_size is not None:
        raise unsupported(NAME, "moe_latent_size", c.moe_latent_size, "None")
    if c.num_nextn_predict_layers:
        raise unsupported(NAME, "num_nextn_predict_layers", c.num_nextn_predict_layers, "0")
    from ...layers.ffn import ACTIVATIONS

    require(NAME, "mlp_hidden_act", c.mlp_hidden_act, tuple(ACTIVATIONS))
    m2 = mamba2_options(NAME, c, heads=c.mamba_num_heads, head_dim=c.mamba_head_dim, groups=c.n_groups,
                        d_state=c.ssm_state_size, d_conv=c.conv_kernel, chunk=c.chunk_size, conv_bias=c.use_conv_bias,
                        bias=c.use_bias, eps=c.layer_norm_epsilon)
    m2.update(dt_min=float(c.time_step_min), dt_max=float(c.time_step_max), dt_init_floor=float(c.time_step_floor))
    act, bias = c.mlp_hidden_act, bool(c.mlp_bias)
    opts = {
        "mamba2": m2,
        "gqa": dict(n_heads=int(c.num_attention_heads), n_kv_heads=int(c.num_key_value_heads),
                    head_dim=int(c.head_dim)),
        "ffn": dict(d_hidden=int(c.intermediate_size), act=act, gated=False, bias=bias),
        "moe": dict(d_hidden=int(c.moe_intermediate_size), n_experts=int(c.n_routed_experts),
                    top_k=int(c.num_experts_per_tok), router="sigmoid", norm_topk=bool(c.norm_topk_prob),
                    scaling=float(c.routed_scaling_factor), n_group=int(c.n_group), topk_group=int(c.topk_group),
                    act=act, gated=False, d_shared=int(c.moe_shared_expert_intermediate_size), shared_bias=bias),
    }
    return ModelConfig(d_model=int(c.hidden_size), pattern=[KINDS[t] for t in c.layers_block_type],
                       vocab_size=int(c.vocab_size), mixer_options=opts, norm="rmsnorm",
                       norm_eps=float(c.layer_norm_epsilon), mlp="none", tie_embeddings=False,
                       residual_in_fp32=bool(c.residual_in_fp32))


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    if cfg.tie_embeddings:
        raise fail("transformers' NemotronH never ties lm_head to the embeddings; the model must be untied")
    back = {v: k for k, v in KINDS.items()}
    bad = sorted(set(model.backbone.mixer_names) - set(back))
    if bad:
        raise fail(f"mixers {bad} have no NemotronH layer type (allowed: {', '.join(back)})")
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        layers_block_type=[back[k] for k in model.backbone.mixer_names],
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=False, residual_in_fp32=cfg.residual_in_fp32)
    if present(model, "mamba2"):
        m, m2 = mamba2_fields(model, "layer_norm_epsilon"), layer_of(model, "mamba2")
        d_inner = m["heads"] * m["head_dim"]
        if d_inner % cfg.d_model == 0:  # unused by transformers' mixer (heads * head_dim is); kept when exact
            fields["expand"] = d_inner // cfg.d_model
        fields.update(
            mamba_num_heads=m["heads"], mamba_head_dim=m["head_dim"], n_groups=m["groups"],
            ssm_state_size=m["d_state"], conv_kernel=m["d_conv"], chunk_size=m["chunk"],
            use_conv_bias=m["conv_bias"], use_bias=m["bias"], time_step_limit=m["limit"], mamba_hidden_act="silu",
            time_step_min=m2.dt_min, time_step_max=m2.dt_max, time_step_floor=m2.dt_init_floor)
    if present(model, "gqa"):
        a = gqa_layer(model)
        if a.rotary_dim or a.q_proj.bias is not None:
            raise fail("NemotronH attention has no rotary embedding and no biases; gqa has rotary_dim="
                       f"{a.rotary_dim}, biases={a.q_proj.bias is not None}")
        fields.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim)
    acts, biases = set(), set()
    if present(model, "ffn"):
        f = layer_of(model, "ffn")
        if f.gated:
            raise fail("NemotronH MLPs are ungated; ffn has gated=True")
        acts.add(f.act)
        biases.add(f.mlp.up_proj.bias is not None)
        fields.update(intermediate_size=f.d_hidden)
    if present(model, "moe"):
        e = layer_of(model, "moe")
        if e.gated or e.router_kind != "sigmoid" or e.d_shared == 0:
            raise fail(f"NemotronH MoE is ungated, router='sigmoid', with a shared expert; moe has gated={e.gated}, "
                       f"router={e.router_kind!r}, d_shared={e.d_shared}")
        acts.add(e.act)
        biases.add(e.shared.up_proj.bias is not None)
        fields.update(moe_intermediate_size=e.d_hidden, n_routed_experts=e.n_experts, num_experts_per_tok=e.top_k,
                      norm_topk_prob=e.norm_topk, routed_scaling_factor=e.scaling, n_group=e.n_group,
                      topk_group=e.topk_group, moe_shared_expert_intermediate_size=e.d_shared)
    if len(acts) > 1 or len(biases) > 1:
        raise fail(f"ffn and moe must share one activation and one bias setting, got {sorted(acts)}, "
                   f"{sorted(biases)}")
    if acts:
        fields.update(mlp_hidden_act=acts.pop(), mlp_bias=biases.pop())
    return fields


MOE_NAMES = {"router.weight": "gate.weight", "router_bias": "gate.e_score_correction_bias",
             "w_in": "experts.up_proj", "w_out": "experts.down_proj"}


def layout(c: Any) -> list[Sub]:
    out = []
    for i, t in enumerate(c.layers_block_type):
        p = f"model.layers.{i}"
        out.append(Sub(KINDS[t], f"{p}.norm.weight", f"{p}.mixer", names=MOE_NAMES if t == "moe" else {},
                       prefixes={"mlp.": ""} if t == "mlp" else {"shared.": "shared_experts."}))
    return out


FAMILY = Family(NAME, "nemotron_h", "NemotronHForCausalLM", "NemotronHConfig", "model.embeddings.weight",
                "model.norm_f.weight", config_from_hf, hf_fields, layout)

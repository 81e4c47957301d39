"""Bamba (``BambaForCausalLM``): Mamba-2 and rotary GQA attention layers, each followed by a SwiGLU MLP.

ssmkit form: every transformers layer is two blocks, ``mamba2`` (or ``gqa`` at ``attn_layer_indices``) then
``ffn``, with rmsnorm pre-norms (input_layernorm, pre_ff_layernorm). Attention rotates the first half of each
head (transformers fixes partial_rotary_factor = 0.5 for Bamba).
"""

from __future__ import annotations

from typing import Any

from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .engine import Family, Sub, common_checks, fail, int_ratio, layer_of, present, require, unsupported

NAME = "Bamba"


def rope(family: str, c: Any, head_dim: int) -> tuple[int, float]:
    """(rotary_dim, rotary_base) of a transformers config with default-type rope_parameters."""
    rp = dict(c.rope_parameters or {})
    require(family, "rope_parameters['rope_type']", rp.get("rope_type", "default"), ("default",))
    dim = int(head_dim * float(rp.get("partial_rotary_factor", 1.0)))
    if dim % 2:
        raise unsupported(family, "rope_parameters['partial_rotary_factor']", rp.get("partial_rotary_factor"),
                          "a factor giving an even rotary width")
    return dim, float(rp["rope_theta"])


def mamba2_options(family: str, c: Any, *, heads: int, head_dim: int, groups: int, d_state: int, d_conv: int,
                   chunk: int, conv_bias: bool, bias: bool, eps: float) -> dict[str, Any]:
    lo, hi = c.time_step_limit
    return dict(d_state=int(d_state), d_conv=int(d_conv),
                expand=int_ratio(family, "mamba heads * head_dim", heads * head_dim, int(c.hidden_size)),
                headdim=int(head_dim), ngroups=int(groups), chunk_size=int(chunk), dt_limit=(float(lo), float(hi)),
                conv_bias=bool(conv_bias), bias=bool(bias), norm_eps=float(eps))


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, ("silu", "swish"))
    head_dim = int(c.hidden_size) // int(c.num_attention_heads)
    rot, base = rope(NAME, c, head_dim)
    pattern = []
    for t in c.layers_block_type:
        pattern += ["gqa" if t == "full_attention" else "mamba2", "ffn"]
    opts = {
        "mamba2": mamba2_options(NAME, c, heads=c.mamba_n_heads, head_dim=c.mamba_d_head, groups=c.mamba_n_groups,
                                 d_state=c.mamba_d_state, d_conv=c.mamba_d_conv, chunk=c.mamba_chunk_size,
                                 conv_bias=c.mamba_conv_bias, bias=c.mamba_proj_bias, eps=c.rms_norm_eps),
        "gqa": dict(n_heads=int(c.num_attention_heads), n_kv_heads=int(c.num_key_value_heads), head_dim=head_dim,
                    rotary_dim=rot, rotary_base=base, qkv_bias=bool(c.attention_bias),
                    out_bias=bool(c.attention_bias)),
        "ffn": dict(d_hidden=int(c.intermediate_size), act="silu", gated=True, bias=bool(c.mlp_bias)),
    }
    return ModelConfig(d_model=int(c.hidden_size), pattern=pattern, vocab_size=int(c.vocab_size),
                       mixer_options=opts, norm="rmsnorm", norm_eps=float(c.rms_norm_eps), mlp="none",
                       tie_embeddings=bool(c.tie_word_embeddings), residual_in_fp32=False)


def paired_layers(model: CausalLM, mixers: tuple[str, ...], mlps: tuple[str, ...]) -> list[str]:
    """The mixer kind of each transformers layer of a (mixer, MLP) * n pattern."""
    names = model.backbone.mixer_names
    ok = len(names) % 2 == 0 and all(a in mixers and b in mlps for a, b in zip(names[::2], names[1::2], strict=False))
    if not ok:
        raise fail(f"the pattern must be (one of {mixers}, then one of {mlps}) per layer, got {names}")
    return names[::2]


def mamba2_fields(model: CausalLM, eps_name: str) -> dict[str, Any]:
    """The Mamba-2 sizes of a model, checked against transformers' single norm epsilon."""
    m = layer_of(model, "mamba2")
    if m.reverse:
        raise fail("mamba2 has reverse=True; the transformers model is causal")
    if m.norm.eps != model.config.norm_eps:
        raise fail(f"the mamba2 gated norm eps ({m.norm.eps}) must equal config.norm_eps ({model.config.norm_eps}):"
                   f" transformers uses one {eps_name}")
    return dict(heads=m.nheads, head_dim=m.headdim, groups=m.ngroups, d_state=m.d_state, d_conv=m.d_conv,
                chunk=m.chunk_size, conv_bias=m.conv1d.bias is not None, bias=m.in_proj.bias is not None,
                limit=tuple(m.dt_limit))


def gqa_layer(model: CausalLM, *, bias_together: bool = True, any_scale: bool = False):
    a = layer_of(model, "gqa")
    if a.scale is not None and not any_scale:
        raise fail(f"gqa scale={a.scale}: this family uses head_dim ** -0.5")
    if bias_together and (a.q_proj.bias is None) != (a.o_proj.bias is None):
        raise fail("gqa qkv_bias and out_bias must be equal (one attention_bias)")
    return a


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    kinds = paired_layers(model, ("mamba2", "gqa"), ("ffn",))
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(kinds),
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attn_layer_indices=[i for i, k in enumerate(kinds) if k == "gqa"] or None)
    if present(model, "mamba2"):
        m = mamba2_fields(model, "rms_norm_eps")
        fields.update(
            mamba_n_heads=m["heads"], mamba_d_head=m["head_dim"], mamba_n_groups=m["groups"],
            mamba_d_state=m["d_state"], mamba_d_conv=m["d_conv"], mamba_chunk_size=m["chunk"],
            mamba_expand=int_ratio(NAME, "mamba d_inner", m["heads"] * m["head_dim"], cfg.d_model),
            mamba_conv_bias=m["conv_bias"], mamba_proj_bias=m["bias"], time_step_limit=m["limit"])
    if present(model, "gqa"):
        a = gqa_layer(model)
        if a.head_dim * a.n_heads != cfg.d_model or a.rotary_dim * 2 != a.head_dim:
            raise fail(f"gqa needs head_dim = d_model / n_heads and rotary_dim = head_dim / 2 in Bamba, got "
                       f"head_dim={a.head_dim}, n_heads={a.n_heads}, rotary_dim={a.rotary_dim}")
        fields.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      attention_bias=a.q_proj.bias is not None,
                      rope_parameters={"rope_type": "default", "rope_theta": a.rotary_base})
    f = layer_of(model, "ffn")
    if (f.act, f.gated) != ("silu", True):
        raise fail(f"ffn must be gated silu in Bamba, got act={f.act!r}, gated={f.gated}")
    fields.update(intermediate_size=f.d_hidden, mlp_bias=f.mlp.up_proj.bias is not None)
    return fields


def layout(c: Any) -> list[Sub]:
    out = []
    for i, t in enumerate(c.layers_block_type):
        p = f"model.layers.{i}"
        attn = t == "full_attention"
        out.append(Sub("gqa" if attn else "mamba2", f"{p}.input_layernorm.weight",
                       f"{p}.self_attn" if attn else f"{p}.mamba"))
        out.append(Sub("ffn", f"{p}.pre_ff_layernorm.weight", f"{p}.feed_forward", prefixes={"mlp.": ""}))
    return out


FAMILY = Family(NAME, "bamba", "BambaForCausalLM", "BambaConfig", "model.embed_tokens.weight",
                "model.final_layernorm.weight", config_from_hf, hf_fields, layout)

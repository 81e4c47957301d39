"""RecurrentGemma (``RecurrentGemmaForCausalLM``, Griffin): each layer is a temporal block, Griffin's recurrent
block or sliding-window MQA/GQA attention with partial rotary (``block_types`` repeated over the layers), then a
gated MLP with biases; embeddings times sqrt(hidden_size) and logits soft-capped by ``logits_soft_cap``.

ssmkit form: two blocks per layer, ``griffin`` (:class:`~ssmkit.layers.griffin.GriffinRecurrent`) or
``local-gqa`` (:class:`~ssmkit.layers.local_gqa.LocalGQAttention`, o_proj with bias) then ``ffn`` (gated, biases,
d_hidden = intermediate_size // 2); ModelConfig's embedding_multiplier and logits_soft_cap.

Two facts of transformers' model that the conversion keeps exactly:
  - the embedding scale is sqrt(hidden_size) rounded to bfloat16 (a bfloat16 buffer), e.g. 6.9375 for 48, not
    6.9282; embedding_multiplier holds that rounded value;
  - its RMSNorms store w and scale by (1 + w) (computed in float32); ssmkit's norms store the scale itself, so
    the weights are shifted by one. A shift that is not exact in the model's dtype (a bfloat16 w whose 1 + w has
    no bfloat16 form; an ssmkit scale s whose s - 1 loses bits) is an error rather than a silent rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...layers.ffn import ACTIVATIONS
from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .bamba import paired_layers, rope
from .engine import Family, Sub, common_checks, fail, from_hf, layer_of, present, require, to_hf, unsupported

NAME = "RecurrentGemma"
KINDS = {"recurrent": "griffin", "attention": "local-gqa"}


def normalizer(d_model: int) -> float:
    """transformers' embedding scale: sqrt(hidden_size) held in a bfloat16 buffer."""
    return float(torch.tensor(d_model ** 0.5, dtype=torch.bfloat16))


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_activation", c.hidden_activation, tuple(ACTIVATIONS))
    require(NAME, "attention_dropout", float(c.attention_dropout), (0.0,))
    cap = c.logits_soft_cap
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise unsupported(NAME, "logits_soft_cap", cap, "a positive number")
    heads, d, lru = int(c.num_attention_heads), int(c.hidden_size), int(c.lru_width)
    if lru % heads:
        raise unsupported(NAME, "lru_width", lru, f"a multiple of num_attention_heads={heads}")
    head_dim = d // heads
    rot, base = rope(NAME, c, head_dim)
    pattern = []
    for t in c.layers_block_type:
        pattern += ["griffin" if t == "linear_attention" else "local-gqa", "ffn"]
    act = str(c.hidden_activation)
    opts = {
        "griffin": dict(lru_width=lru, n_heads=heads, conv_width=int(c.conv1d_width), act=act),
        "local-gqa": dict(n_heads=heads, n_kv_heads=int(c.num_key_value_heads), head_dim=head_dim, rotary_dim=rot,
                          rotary_base=base, window=int(c.attention_window_size), qkv_bias=bool(c.attention_bias),
                          out_bias=True),
        "ffn": dict(d_hidden=int(c.intermediate_size) // 2, act=act, gated=True, bias=True),
    }
    return ModelConfig(d_model=d, pattern=pattern, vocab_size=int(c.vocab_size), mixer_options=opts, norm="rmsnorm",
                       norm_eps=float(c.rms_norm_eps), mlp="none", tie_embeddings=bool(c.tie_word_embeddings),
                       residual_in_fp32=False, embedding_multiplier=normalizer(d), logits_soft_cap=float(cap))


def _period(types: list[str]) -> list[str]:
    """The shortest list whose repetition gives ``types`` (transformers repeats ``block_types``)."""
    return next(types[:p] for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model, soft_cap=True)
    kinds = paired_layers(model, tuple(KINDS.values()), ("ffn",))
    if cfg.embedding_multiplier != normalizer(cfg.d_model):
        raise fail(f"RecurrentGemma scales embeddings by sqrt(d_model) in bfloat16 = {normalizer(cfg.d_model)}, got "
                   f"config.embedding_multiplier={cfg.embedding_multiplier}")
    if cfg.residual_multiplier != 1.0 or cfg.logits_scaling != 1.0:
        raise fail("RecurrentGemma has no residual_multiplier or logits_scaling (both must be 1.0)")
    if cfg.logits_soft_cap is None:
        raise fail("RecurrentGemma soft-caps its logits: config.logits_soft_cap must be set")
    if cfg.residual_in_fp32 and model.backbone.param_dtype in (torch.float16, torch.bfloat16):
        raise fail("RecurrentGemma keeps the residual stream in the parameters' dtype: config.residual_in_fp32 "
                   "must be False for a 16-bit model")
    f = layer_of(model, "ffn")
    if (f.gated, f.mlp.up_proj.bias is not None, f.mlp.gate_multiplier, f.mlp.down_multiplier) != (True, True, 1, 1):
        raise fail("RecurrentGemma's MLP is gated with biases and no multipliers")
    heads = set()
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(kinds),
        block_types=_period(["recurrent" if k == "griffin" else "attention" for k in kinds]),
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_activation=f.act,
        logits_soft_cap=cfg.logits_soft_cap, intermediate_size=2 * f.d_hidden, attention_dropout=0.0)
    if present(model, "griffin"):
        g = layer_of(model, "griffin")
        if g.act != f.act or g.c != 8.0:
            raise fail(f"RecurrentGemma uses one hidden_activation and c=8: griffin has act={g.act!r}, c={g.c}, "
                       f"ffn has act={f.act!r}")
        heads.add(g.n_heads)
        fields.update(lru_width=g.lru_width, conv1d_width=g.conv_width)
    if present(model, "local-gqa"):
        a = layer_of(model, "local-gqa")
        if a.scale is not None or a.key_multiplier != 1.0 or a.o_proj.bias is None or a.head_dim != cfg.d_model // \
                a.n_heads:
            raise fail(f"RecurrentGemma attention has head_dim = d_model // n_heads = {cfg.d_model // a.n_heads} "
                       f"(got {a.head_dim}), scale head_dim ** -0.5, no key_multiplier and an o_proj bias")
        factor = a.rotary_dim / a.head_dim
        if int(a.head_dim * factor) != a.rotary_dim:
            raise fail(f"rotary_dim={a.rotary_dim} of head_dim={a.head_dim} has no partial_rotary_factor")
        heads.add(a.n_heads)
        fields.update(num_key_value_heads=a.n_kv_heads, attention_bias=a.q_proj.bias is not None,
                      attention_window_size=a.window,
                      rope_parameters={"rope_type": "default", "rope_theta": a.rotary_base,
                                       "partial_rotary_factor": factor})
    if len(heads) != 1:
        raise fail(f"RecurrentGemma uses one num_attention_heads for gate blocks and attention, got {sorted(heads)}")
    fields["num_attention_heads"] = heads.pop()
    return fields


def layout(c: Any) -> list[Sub]:
    out = []
    for i, t in enumerate(c.layers_block_type):
        p = f"model.layers.{i}"
        out.append(Sub("griffin" if t == "linear_attention" else "local-gqa", f"{p}.temporal_pre_norm.weight",
                       f"{p}.temporal_block"))
        out.append(Sub("ffn", f"{p}.channel_pre_norm.weight", f"{p}.mlp_block", prefixes={"mlp.": ""}))
    return out


FAMILY = Family(NAME, "recurrent_gemma", "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
                "model.embed_tokens.weight", "model.final_norm.weight", config_from_hf, hf_fields, layout)


# ------------------------------------------------------------------------------------------- the (1 + w) norms
def _scale_from_hf(w: Tensor, key: str) -> Tensor:
    """transformers' norm weight w -> ssmkit's scale 1 + w (computed in at least float32, as transformers does);
    an error when the model's dtype cannot hold it (then ssmkit's model would not compute the same function)."""
    acc = torch.promote_types(w.dtype, torch.float32)
    want = w.to(acc) + 1
    out = want.to(w.dtype)
    if not torch.equal(out.to(acc), want):
        raise ValueError(f"{NAME}: the norm scale 1 + w of {key} has no exact {w.dtype} form (transformers scales "
                         f"by 1 + w in float32, ssmkit's norm stores the scale); convert the model in float32")
    return out


def _w_to_hf(s: Tensor, key: str) -> Tensor:
    """ssmkit's scale s -> transformers' norm weight w = s - 1, exact (1 + w == s) or an error."""
    acc = torch.promote_types(s.dtype, torch.float32)
    w = (s.to(acc) - 1).to(s.dtype)
    if not torch.equal(w.to(acc) + 1, s.to(acc)):
        raise ValueError(f"to_transformers: {NAME} stores a norm as w and scales by 1 + w; the scale of {key} is not "
                         f"exactly 1 + w for any {s.dtype} w (exact for scales in [0.5, 2])")
    return w


def _norm_params(model: CausalLM) -> list[tuple[str, nn.Parameter]]:
    blocks = [(f"backbone.blocks.{j}.norm.weight", b.norm.weight) for j, b in enumerate(model.backbone.blocks)]
    return [*blocks, ("backbone.final_norm.weight", model.backbone.final_norm.weight)]


def from_transformers(hf: nn.Module) -> CausalLM:
    """An ssmkit CausalLM equal to a transformers RecurrentGemmaForCausalLM (same dtype and device)."""
    model = from_hf(FAMILY, hf)
    with torch.no_grad():
        for k, p in _norm_params(model):
            p.copy_(_scale_from_hf(p, k))
    return model


def to_transformers(model: CausalLM, overrides: dict[str, Any]) -> nn.Module:
    """The RecurrentGemmaForCausalLM equal to ``model`` (same dtype and device)."""
    hf = to_hf(FAMILY, model, overrides)
    theirs = hf.state_dict()
    with torch.no_grad():
        for key in [s.norm for s in layout(hf.config)] + [FAMILY.final_norm]:
            theirs[key].copy_(_w_to_hf(theirs[key], key))
    return hf

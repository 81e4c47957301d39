"""Zamba2 (``Zamba2ForCausalLM``): Mamba-2 layers, and "hybrid" layers where one of ``num_mem_blocks`` shared
attention + MLP blocks (reused at several depths, with per-invocation low-rank adapters) reads concat(hidden,
input embeddings) and, through a per-layer linear map, adds to that layer's Mamba-2 input.

ssmkit form: one block per transformers layer, ``mamba2`` (pre-norm input_layernorm) or ``zamba2``
(:class:`~ssmkit.layers.zamba2_shared.Zamba2Hybrid`, no block pre-norm; the shared blocks' weights are the
backbone's ``shared.{b}``). transformers ties the shared blocks, so its state_dict repeats their weights under
every hybrid layer: each ssmkit weight maps to all its copies, which must be equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...models.checkpoint import load_state
from ...models.config import ModelConfig
from ...models.heads import CausalLM
from .engine import (
    Family,
    Key,
    common_checks,
    fail,
    hf_config,
    layer_of,
    part,
    present,
    require,
    single_kind,
    unsupported,
)

NAME = "Zamba2"
_ACTS = {"gelu": "gelu", "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu",
         "relu2": "relu2"}
_SSM_NORM_EPS = 1e-5  # transformers fixes the gated norm's epsilon of Zamba2's Mamba-2


def config_from_hf(c: Any) -> ModelConfig:
    require(NAME, "hidden_act", c.hidden_act, tuple(_ACTS))
    require(NAME, "attention_dropout", c.attention_dropout, (0, 0.0))  # ssmkit's attention has no dropout
    kinds = {"linear_attention": "mamba2", "hybrid": "zamba2"}
    for t in c.layers_block_type:
        require(NAME, "layers_block_type entry", t, tuple(kinds))
    d, heads = int(c.hidden_size), int(c.num_attention_heads)
    if (2 * d) % heads:
        raise unsupported(NAME, "num_attention_heads", heads, f"a divisor of 2 * hidden_size = {2 * d}")
    kv = int(c.num_key_value_heads)
    if c.use_shared_attention_adapter and kv != heads:
        raise unsupported(NAME, "num_key_value_heads", kv, f"{heads} with use_shared_attention_adapter (transformers"
                                                           f" adds 2 * hidden_size wide adapters to the keys)")
    d_inner = int(c.mamba_expand * d)
    if d_inner % int(c.n_mamba_heads):
        raise unsupported(NAME, "n_mamba_heads", c.n_mamba_heads,
                          f"a divisor of mamba_expand * hidden_size = {d_inner}")
    base = 10000.0
    if c.use_mem_rope:
        rp = dict(c.rope_parameters or {})
        require(NAME, "rope_parameters['rope_type']", rp.get("rope_type", "default"), ("default",))
        if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
            raise unsupported(NAME, "rope_parameters['partial_rotary_factor']", rp["partial_rotary_factor"], "1.0")
    if c.rope_parameters and "rope_theta" in c.rope_parameters:
        base = float(c.rope_parameters["rope_theta"])
    m2 = dict(d_state=int(c.mamba_d_state), d_conv=int(c.mamba_d_conv), expand=int(c.mamba_expand),
              headdim=d_inner // int(c.n_mamba_heads), ngroups=int(c.mamba_ngroups), chunk_size=int(c.chunk_size),
              dt_min=float(c.time_step_min), dt_max=float(c.time_step_max), dt_init_floor=float(c.time_step_floor),
              dt_limit=(float(c.time_step_min), math.inf), conv_bias=True, bias=bool(c.add_bias_linear))
    z2 = dict(n_shared=int(c.num_mem_blocks), n_heads=heads, n_kv_heads=kv, rotary=bool(c.use_mem_rope),
              rotary_base=base, d_hidden=int(c.intermediate_size), act=_ACTS[c.hidden_act],
              mlp_bias=bool(c.add_bias_linear), adapter_rank=int(c.adapter_rank),
              attn_adapters=bool(c.use_shared_attention_adapter), norm_eps=float(c.rms_norm_eps), **m2,
              ssm_norm_eps=_SSM_NORM_EPS)
    return ModelConfig(d_model=d, pattern=[kinds[t] for t in c.layers_block_type], vocab_size=int(c.vocab_size),
                       mixer_options={"mamba2": {**m2, "norm_eps": _SSM_NORM_EPS}, "zamba2": z2}, norm="rmsnorm",
                       norm_eps=float(c.rms_norm_eps), mlp="none", tie_embeddings=bool(c.tie_word_embeddings),
                       residual_in_fp32=False)


def _mamba_fields(m: nn.Module) -> tuple:
    return (m.d_state, m.d_conv, m.d_inner, m.headdim, m.ngroups, m.chunk_size, m.dt_min, m.dt_max, m.dt_init_floor,
            m.dt_limit, m.conv1d.bias is not None, m.in_proj.bias is not None, m.norm.eps, m.reverse)


def hf_fields(model: CausalLM) -> dict[str, Any]:
    cfg = common_checks(model)
    single_kind(model, ("mamba2", "zamba2"))
    if (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) != (1.0, 1.0, 1.0):
        raise fail("Zamba2 has no embedding/residual/logits multipliers (they must be 1.0)")
    z = layer_of(model, "zamba2")
    m = z.mamba
    if present(model, "mamba2") and _mamba_fields(layer_of(model, "mamba2")) != _mamba_fields(m):
        raise fail("the mamba2 blocks and the zamba2 blocks' Mamba-2 must have the same options (one Zamba2Config)")
    lo, hi = m.dt_limit
    if m.reverse or m.conv1d.bias is None or m.norm.eps != _SSM_NORM_EPS or hi != math.inf or lo != m.dt_min:
        raise fail(f"Zamba2's Mamba-2 is causal with conv_bias=True, norm_eps={_SSM_NORM_EPS} and dt_limit="
                   f"(dt_min, inf), got reverse={m.reverse}, conv_bias={m.conv1d.bias is not None}, "
                   f"norm_eps={m.norm.eps}, dt_limit={m.dt_limit}, dt_min={m.dt_min}")
    if z.norm_eps != cfg.norm_eps:
        raise fail(f"zamba2 norm_eps ({z.norm_eps}) must equal config.norm_eps ({cfg.norm_eps}): one rms_norm_eps")
    if z.mlp_bias != (m.in_proj.bias is not None):
        raise fail(f"zamba2 mlp_bias ({z.mlp_bias}) and the Mamba-2 bias must be equal (one add_bias_linear)")
    if m.d_inner % cfg.d_model:
        raise fail(f"the Mamba-2 d_inner={m.d_inner} must be an integer multiple of d_model={cfg.d_model}")
    names = model.backbone.mixer_names
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=len(names),
        layers_block_type=["hybrid" if n == "zamba2" else "linear_attention" for n in names],
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv, mamba_expand=m.d_inner // cfg.d_model, mamba_ngroups=m.ngroups,
        n_mamba_heads=m.nheads, chunk_size=m.chunk_size, time_step_min=m.dt_min, time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor, use_conv_bias=True, add_bias_linear=z.mlp_bias,
        intermediate_size=z.d_hidden, hidden_act=z.act, num_attention_heads=z.attn.n_heads,
        num_key_value_heads=z.attn.n_kv_heads, num_mem_blocks=z.n_shared, adapter_rank=z.adapter_rank,
        use_shared_attention_adapter=z.attn_adapters, use_mem_rope=z.rotary,
        rope_parameters={"rope_type": "default", "rope_theta": z.attn.rotary_base})


def layout(c: Any) -> list:
    return []  # unused: Zamba2 maps its weights with key_pairs below


# ------------------------------------------------------------------------------------------- weight names
_SHARED = {"input_norm.weight": "input_layernorm.weight", "ff_norm.weight": "pre_ff_layernorm.weight",
           **{f"{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
           **{f"down_proj.{w}": f"feed_forward.down_proj.{w}" for w in ("weight", "bias")},
           **{f"{p}_proj.{w}": (f"feed_forward.gate_up_proj.{w}", i, 2)
              for i, p in enumerate(("gate", "up")) for w in ("weight", "bias")}}


def _adapter_key(key: str, k: int) -> str:
    """transformers' name (under a shared_transformer) of an adapter weight of invocation k."""
    which = {"down": 0, "up": 1}[key.split(".")[-2]]
    if key.startswith("mlp_adapter."):
        return f"feed_forward.gate_up_proj_adapter_list.{k}.{which}.weight"
    return f"self_attn.linear_{key.split('.')[1][0]}_adapter_list.{k}.{which}.weight"


def key_pairs(c: Any, model: CausalLM) -> dict[str, list[Key]]:
    """ssmkit key -> every transformers key (or row block) holding that weight (tied lm_head excluded)."""
    kinds = ["zamba2" if t == "hybrid" else "mamba2" for t in c.layers_block_type]
    if kinds != model.backbone.mixer_names:
        raise ValueError(f"{NAME}: the model's pattern {model.backbone.mixer_names} does not match the transformers "
                         f"layers {list(c.layers_block_type)}")
    pairs: dict[str, list[Key]] = {"backbone.embedding.weight": [("model.embed_tokens.weight", 0, 1)],
                                   "backbone.final_norm.weight": [("model.final_layernorm.weight", 0, 1)]}
    if not model.config.tie_embeddings:
        pairs["lm_head.weight"] = [("lm_head.weight", 0, 1)]
    hybrids = [j for j, k in enumerate(kinds) if k == "zamba2"]
    n = int(c.num_mem_blocks)
    shared = model.backbone.shared
    for j, kind in enumerate(kinds):
        mixer, ours, p = model.backbone.blocks[j].mixer, f"backbone.blocks.{j}", f"model.layers.{j}"
        if kind == "mamba2":
            pairs[f"{ours}.norm.weight"] = [(f"{p}.input_layernorm.weight", 0, 1)]
            pairs.update({f"{ours}.mixer.{k}": [(f"{p}.mamba.{k}", 0, 1)] for k in mixer.state_dict()})
            continue
        k = hybrids.index(j)
        users = [f"model.layers.{i}.shared_transformer" for q, i in enumerate(hybrids) if q % n == k % n]
        for key in mixer.state_dict():
            if key.startswith(("attn.", "mlp_adapter.")):
                pairs[f"{ours}.mixer.{key}"] = [(f"{u}.{_adapter_key(key, k)}", 0, 1) for u in users]
            elif key.startswith("mamba."):
                pairs[f"{ours}.mixer.{key}"] = [(f"{p}.mamba_decoder.{key}", 0, 1)]
            else:  # linear.weight, norm.weight
                own = {"linear.weight": "linear.weight", "norm.weight": "mamba_decoder.input_layernorm.weight"}[key]
                pairs[f"{ours}.mixer.{key}"] = [(f"{p}.{own}", 0, 1)]
        if k < n:  # the first invocation of shared block k
            for key in shared[k].state_dict():
                v = _SHARED[key]
                v = (v, 0, 1) if isinstance(v, str) else v
                pairs[f"backbone.shared.{k}.{key}"] = [(f"{u}.{v[0]}", v[1], v[2]) for u in users]
    return pairs


def _check_cover(pairs: dict[str, list[Key]], theirs: dict[str, Tensor], tied: bool) -> None:
    mapped = {t[0] for keys in pairs.values() for t in keys}
    missing = sorted(mapped - set(theirs))
    unmapped = sorted(set(theirs) - mapped - ({"lm_head.weight"} if tied else set()))
    if missing or unmapped:
        raise ValueError(f"{NAME}: weights do not map one to one -- not in transformers' model: "
                         f"{', '.join(missing) or 'none'}; not mapped: {', '.join(unmapped) or 'none'}")


def from_transformers(hf: nn.Module) -> CausalLM:
    """An ssmkit CausalLM computing the same function as the transformers Zamba2 ``hf`` (same dtype, device)."""
    config = config_from_hf(hf.config)
    ref = hf.lm_head.weight
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG untouched
        model = CausalLM(config).to(device=ref.device, dtype=ref.dtype)
    pairs = key_pairs(hf.config, model)
    theirs = hf.state_dict()
    _check_cover(pairs, theirs, config.tie_embeddings)
    tensors = {}
    for ours, keys in pairs.items():
        first = part(theirs[keys[0][0]], keys[0])
        for other in keys[1:]:
            if not torch.equal(part(theirs[other[0]], other), first):
                raise ValueError(f"{NAME}: {other[0]} and {keys[0][0]} are copies of one shared weight but differ "
                                 f"(transformers ties the shared blocks only with tie_word_embeddings=True)")
        tensors[ours] = first.detach()
    load_state(model, tensors, where=f"transformers {type(hf).__name__}")
    return model.eval()


def to_transformers(model: CausalLM, overrides: dict[str, Any]) -> nn.Module:
    """A transformers Zamba2ForCausalLM computing the same function as ``model`` (same dtype, device)."""
    import transformers

    cfg = hf_config(FAMILY, model, overrides)
    ref = model.lm_head.weight
    with torch.random.fork_rng(devices=[]):
        hf = transformers.Zamba2ForCausalLM(cfg).to(device=ref.device, dtype=ref.dtype)
    try:
        pairs = key_pairs(cfg, model)
    except ValueError as e:
        raise fail(str(e)) from None
    theirs = hf.state_dict()
    _check_cover(pairs, theirs, cfg.tie_word_embeddings)
    ours = model.state_dict()
    with torch.no_grad():
        for o, keys in pairs.items():
            for t in keys:
                dst = part(theirs[t[0]], t)
                if dst.shape != ours[o].shape:
                    raise fail(f"{o} {tuple(ours[o].shape)} does not fit {t[0]} {tuple(dst.shape)}")
                dst.copy_(ours[o])
    if cfg.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("to_transformers: transformers did not tie Zamba2ForCausalLM's lm_head")
    return hf.eval()


FAMILY = Family(NAME, "zamba2", "Zamba2ForCausalLM", "Zamba2Config", "model.embed_tokens.weight",
                "model.final_layernorm.weight", config_from_hf, hf_fields, layout)

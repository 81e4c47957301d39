"""Tiny random transformers hybrid LMs (no downloads) covering each family's options, for the interop tests."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

VOCAB = 32
NO_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # nothing stops generation early


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight (parameters, persistent buffers) off its default so that a swapped or missed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():  # persistent buffers too (not e.g. rotary frequencies)
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * 0.2)
    return module.eval()


def _build(cls_name: str, cfg_name: str, seed: int, **kw) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, **{**NO_TOKENS, **kw})
    return randomise(getattr(transformers, cls_name)(cfg), seed)


def falcon_mamba(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "state_size": 4, "num_hidden_layers": 2, "time_step_rank": 4, **kw}
    return _build("FalconMambaForCausalLM", "FalconMambaConfig", seed, **kw)


def bamba(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_state": 4,
          "mamba_chunk_size": 4, "mamba_n_groups": 2, **kw}
    return _build("BambaForCausalLM", "BambaConfig", seed, **kw)


def nemotron_h(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 24,
          "ssm_state_size": 4, "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "n_routed_experts": 4,
          "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 12, "chunk_size": 4, **kw}
    return _build("NemotronHForCausalLM", "NemotronHConfig", seed, **kw)


def jamba(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
          "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_dt_rank": 3, **kw}
    return _build("JambaForCausalLM", "JambaConfig", seed, **kw)


def granite(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "intermediate_size": 8, "shared_intermediate_size": 12, "num_hidden_layers": 3,
          "layer_types": ["mamba", "attention", "mamba"], "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_local_experts": 4, "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_d_state": 4,
          "mamba_chunk_size": 4, "mamba_n_groups": 2, "embedding_multiplier": 3.0, "residual_multiplier": 0.4,
          "logits_scaling": 2.5, "attention_multiplier": 0.3, **kw}
    return _build("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", seed, **kw)


def falcon_h1(seed: int = 0, **kw):
    kw = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 4, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
          "mamba_d_state": 4, "mamba_n_groups": 2, "mamba_chunk_size": 4, "embedding_multiplier": 2.0,
          "lm_head_multiplier": 0.5, "mlp_multipliers": [1.5, 0.75], "key_multiplier": 0.8,
          "attention_in_multiplier": 1.25, "attention_out_multiplier": 0.6,
          "ssm_multipliers": [0.5, 1.5, 2.0, 0.25, 1.2], "ssm_in_multiplier": 0.9, "ssm_out_multiplier": 1.1, **kw}
    return _build("FalconH1ForCausalLM", "FalconH1Config", seed, **kw)


#: name -> builder; each family twice, the second covering its other options
HF_MODELS = {
    "falcon_mamba": lambda: falcon_mamba(),
    "falcon_mamba-bias-untied": lambda: falcon_mamba(
        1, use_bias=True, use_conv_bias=False, expand=3, tie_word_embeddings=False, layer_norm_epsilon=1e-3,
        mixer_rms_eps=1e-3, residual_in_fp32=False),
    "bamba": lambda: bamba(),
    "bamba-bias-tied-mha": lambda: bamba(
        2, attention_bias=True, mlp_bias=True, mamba_proj_bias=True, mamba_conv_bias=False, tie_word_embeddings=True,
        time_step_limit=(0.01, 0.5), attn_layer_indices=[0, 2], num_key_value_heads=4, mamba_n_groups=1,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-4),
    "nemotron_h": lambda: nemotron_h(),
    "nemotron_h-groups-bias": lambda: nemotron_h(
        3, n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.5, mlp_bias=True, use_bias=True,
        use_conv_bias=False, mlp_hidden_act="gelu", num_experts_per_tok=1, time_step_limit=(0.01, 0.5),
        layers_block_type=["linear_attention", "full_attention", "moe", "mlp", "moe"],
        layer_norm_epsilon=1e-4),
    "jamba": lambda: jamba(),
    "jamba-dense-tied": lambda: jamba(
        4, num_experts=1, attn_layer_period=4, attn_layer_offset=0, mamba_proj_bias=True, mamba_conv_bias=False,
        tie_word_embeddings=True, mamba_expand=1, num_key_value_heads=1, rms_norm_eps=1e-4),
    "granite": lambda: granite(),
    "granite-dense-rope-tied": lambda: granite(
        5, num_local_experts=0, position_embedding_type="rope", tie_word_embeddings=True, attention_bias=True,
        layer_types=["attention", "mamba", "attention"], rope_parameters={"rope_type": "default", "rope_theta": 300.0},
        mamba_proj_bias=True, rms_norm_eps=1e-4),
    "falcon_h1": lambda: falcon_h1(),
    "falcon_h1-norm-bias-tied": lambda: falcon_h1(
        6, mamba_rms_norm=True, mamba_norm_before_gate=False, attention_bias=True, mlp_bias=True, mamba_proj_bias=True,
        projectors_bias=True, mamba_conv_bias=False, tie_word_embeddings=True, num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    "falcon_h1-norm-before-gate": lambda: falcon_h1(7, mamba_rms_norm=True, mamba_norm_before_gate=True),
}

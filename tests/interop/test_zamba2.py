"""Zamba2 against transformers' Zamba2ForCausalLM: logits within 1e-4 (float32 and float64), 30 greedy tokens equal
to transformers' cached ``generate``, chunked cached forwards and steps equal to one full forward, exact round trips,
one-line errors for options ssmkit does not implement; and the Zamba2Hybrid layer's own contract (step, state
passing, packing) in float64. Never touches the hub."""

from __future__ import annotations

import pytest
import torch

from tests.interop.hybrid_models import NO_TOKENS, VOCAB, randomise

transformers = pytest.importorskip("transformers")

from ssmkit.infer import generate  # noqa: E402
from ssmkit.interop import from_transformers, to_transformers  # noqa: E402
from ssmkit.layers.zamba2_shared import Zamba2Hybrid  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
from tests.interop.hybrid_checks import (  # noqa: E402
    chunked_logits,
    logits,
    quiet_one_thread,
    tokens,
)
from tests.layers.contract import assert_close  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    with quiet_one_thread():
        yield


def zamba2(seed: int = 0, **kw) -> torch.nn.Module:
    kw = {"hidden_size": 16, "num_hidden_layers": 5,
          "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid", "hybrid"],
          "mamba_d_state": 4, "n_mamba_heads": 4, "mamba_ngroups": 2, "chunk_size": 4, "num_attention_heads": 4,
          "num_mem_blocks": 2, "adapter_rank": 3, "use_shared_attention_adapter": True, "use_mem_rope": True,
          "intermediate_size": 24, **kw}
    torch.manual_seed(seed)
    cfg = transformers.Zamba2Config(vocab_size=VOCAB, **{**NO_TOKENS, **kw})
    return randomise(transformers.Zamba2ForCausalLM(cfg), seed)


def _ours(seed: int, **opts) -> CausalLM:
    """A random ssmkit Zamba2-shaped model (any weights: the shared blocks are ssmkit's own)."""
    m2 = dict(d_state=4, headdim=8, ngroups=2, chunk_size=4, dt_limit=(1e-3, float("inf")), **opts.pop("m2", {}))
    z2 = {**dict(n_shared=2, n_heads=4, d_hidden=24, adapter_rank=3), **m2, **opts.pop("z2", {})}
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, vocab_size=VOCAB, pattern=opts.pop("pattern", "zamba2,mamba2,zamba2,zamba2"),
                      mixer_options={"mamba2": m2, "zamba2": z2}, residual_in_fp32=False, **opts)
    return randomise(CausalLM(cfg), seed)


MODELS = {
    # two shared blocks over three invocations, adapters on q/k/v and the MLP, rotary (base 500), gelu
    "zamba2": lambda: zamba2(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # one shared block, GQA, no rotary, no attention adapters, biases, silu, a hybrid first layer, a dt floor
    "zamba2-gqa-bias-silu": lambda: zamba2(
        1, layers_block_type=["hybrid", "mamba", "hybrid", "mamba"], num_hidden_layers=4, num_mem_blocks=1,
        use_shared_attention_adapter=False, use_mem_rope=False, num_key_value_heads=2, hidden_act="silu",
        add_bias_linear=True, rms_norm_eps=1e-4, time_step_min=0.01, mamba_ngroups=1, mamba_expand=1,
        n_mamba_heads=2),
    # untied lm_head: transformers then leaves the shared blocks untied too, so the reference is made from ssmkit
    "zamba2-untied": lambda: to_transformers(_ours(2, tie_embeddings=False, z2={"rotary": True}), family="zamba2"),
}
# transformers 5.25's one-token Mamba-2 step ignores time_step_min, which its chunked forward applies as a floor on
# dt: with "zamba2-gqa-bias-silu" its cached step's logits drift 2.6e-4 from its own full forward, but its greedy
# tokens still agree with its uncached generate and with ssmkit's (whose step applies the floor).


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_and_round_trips_are_exact(name):
    hf = MODELS[name]()
    ours = from_transformers(hf)
    x = tokens(2, 13, seed=1)
    assert (logits(ours, x) - logits(hf, x)).abs().max().item() <= TOL
    back = to_transformers(ours)  # the one family that fits
    assert type(back) is type(hf)
    assert back.config.to_dict() == hf.config.to_dict()
    theirs = hf.state_dict()
    assert back.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[k]) for k, t in back.state_dict().items())
    again = from_transformers(back)
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(),
                                                   strict=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_logits(name):
    hf = MODELS[name]().double()
    ours = from_transformers(hf)
    assert ours.lm_head.weight.dtype == torch.float64
    x = tokens(2, 11, seed=2)
    assert (logits(ours, x) - logits(hf, x)).abs().max().item() <= TOL  # transformers keeps A, rotary in float32


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_transformers_generate(name):
    hf = MODELS[name]()
    ours = from_transformers(hf)
    prompt = tokens(2, 5, seed=3)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                           min_new_tokens=30, use_cache=True)[:, prompt.shape[1]:]
    assert torch.equal(generate(ours, prompt, 30), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_chunks_and_steps_equal_the_full_forward(name):
    ours = from_transformers(MODELS[name]()).double()
    x = tokens(2, 16, seed=4)
    full = logits(ours, x)
    assert_close(chunked_logits(ours, x), full, 1e-10, f"{name} chunked")  # chunks through the cache, steps


def test_packed_sequences_equal_separate_runs():
    ours = _ours(3, z2={"rotary": True, "attn_adapters": True}).double()
    a, b = tokens(1, 7, seed=5), tokens(1, 6, seed=6)
    reset = torch.zeros(1, 13, dtype=torch.bool)
    reset[0, 7] = True
    with torch.no_grad():
        packed = ours(torch.cat([a, b], 1), reset=reset).logits
        assert_close(packed, torch.cat([ours(a).logits, ours(b).logits], 1), 1e-10, "packed vs separate")


def test_shared_weights_are_held_once_and_used_by_every_invocation():
    ours = _ours(4)  # invocations 0, 1, 2 use shared blocks 0, 1, 0
    hybrids = [b.mixer for b in ours.backbone.blocks if isinstance(b.mixer, Zamba2Hybrid)]
    assert [h.shared[0] for h in hybrids] == [ours.backbone.shared[i] for i in (0, 1, 0)]
    assert sum(k.startswith("backbone.shared.") and k.endswith("q_proj.weight") for k in ours.state_dict()) == 2
    x = tokens(1, 6)
    before = logits(ours, x)
    with torch.no_grad():
        ours.backbone.shared[1].q_proj.weight.mul_(2.0)
    assert (logits(ours, x) - before).abs().max().item() > 1e-4
    clone = CausalLM(ours.config)
    clone.load_state_dict(ours.state_dict())
    assert torch.equal(logits(clone, x), logits(ours, x))


@pytest.mark.parametrize("make, match", [
    (lambda: zamba2(hidden_act="tanh"), r"Zamba2: config option hidden_act='tanh' is not supported"),
    (lambda: zamba2(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     r"Zamba2: config option rope_parameters\['rope_type'\]='linear' is not supported"),
    (lambda: zamba2(attention_dropout=0.1), r"Zamba2: config option attention_dropout=0.1 is not supported"),
    (lambda: zamba2(num_key_value_heads=2), r"Zamba2: config option num_key_value_heads=2 is not supported"),
    (lambda: zamba2(n_mamba_heads=3, mamba_ngroups=1),
     r"Zamba2: config option n_mamba_heads=3 is not supported"),
])
def test_unsupported_transformers_options_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        from_transformers(make())
    assert "\n" not in str(e.value)


def test_untied_copies_that_differ_fail_in_one_line():
    hf = zamba2(tie_word_embeddings=False)  # transformers leaves the "shared" blocks untied: random copies differ
    with pytest.raises(ValueError, match=r"are copies of one shared weight but differ") as e:
        from_transformers(hf)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make, match", [
    (lambda: _ours(0, z2={"d_state": 8}),
     r"the mamba2 blocks and the zamba2 blocks' Mamba-2 must have the same options"),
    (lambda: _ours(0, z2={"norm_eps": 1e-3}), r"zamba2 norm_eps \(0.001\) must equal config.norm_eps"),
    (lambda: _ours(0, z2={"mlp_bias": True}), r"mlp_bias \(True\) and the Mamba-2 bias must be equal"),
    (lambda: _ours(0, pattern="zamba2,gqa"), r"mixers \['gqa'\] have no place in this family"),
])
def test_models_transformers_cannot_hold_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        to_transformers(make(), family="zamba2")
    assert "\n" not in str(e.value)


def test_layer_needs_its_shared_block_and_the_embeddings():
    layer = Zamba2Hybrid(8, n_heads=2, d_state=4, headdim=4, chunk_size=4)
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="no shared block"):
        layer(x, embeddings=x)
    layer.attach(layer.make_shared())
    with pytest.raises(ValueError, match=r"embeddings \(the model's input embeddings\) must match h"):
        layer(x)
    assert layer(x, embeddings=x).shape == x.shape


def test_int8_weights_reach_the_shared_blocks():
    from ssmkit.infer import Int8Linear, quantize_weights

    ours = _ours(5, z2={"rotary": True, "attn_adapters": True}).eval()
    q = quantize_weights(ours)  # a deep copy: its mixers must use the copy's (quantized) shared blocks
    hybrids = [b.mixer for b in q.backbone.blocks if isinstance(b.mixer, Zamba2Hybrid)]
    assert all(h.shared[0] in list(q.backbone.shared) for h in hybrids)
    assert isinstance(q.backbone.shared[0].q_proj, Int8Linear)
    prompt = tokens(2, 4)
    assert generate(q, prompt, 5).shape == (2, 5)
    with torch.no_grad():
        q.backbone.shared[0].q_proj.scale.mul_(3.0)  # the quantized weights are the ones in use
        assert (logits(q, prompt) - logits(quantize_weights(ours), prompt)).abs().max().item() > 1e-4


def test_gradients_match_transformers_including_the_shared_weights():
    from ssmkit.interop.hybrids.engine import part
    from ssmkit.interop.hybrids.zamba2 import key_pairs

    hf = MODELS["zamba2"]().double()
    ours = from_transformers(hf)
    x = tokens(2, 9, seed=7)
    hf(x).logits.square().mean().backward()
    ours(x).logits.square().mean().backward()
    theirs = dict(hf.named_parameters())  # tied copies appear once, with the gradient of every use
    pairs = key_pairs(hf.config, ours)
    for key, p in ours.named_parameters():
        t = next(k for k in pairs[key] if k[0] in theirs)
        assert_close(p.grad, part(theirs[t[0]].grad, t), 1e-5, key)  # transformers keeps parts in float32

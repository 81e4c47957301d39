"""transformers' RecurrentGemma (Griffin) against ssmkit: logits within 1e-4 of transformers' CPU forward (float32
and float64), 30 greedy tokens identical to transformers' cached ``generate`` (well past the attention window),
chunked cached forwards and steps equal to one full forward, exact round trips both ways, and one-line errors for
what either side cannot hold. Never touches the hub."""

from __future__ import annotations

import pytest
import torch

from tests.interop.hybrid_models import NO_TOKENS, VOCAB, randomise

transformers = pytest.importorskip("transformers")

from ssmkit.infer import generate  # noqa: E402
from ssmkit.interop import from_transformers, to_transformers  # noqa: E402
from ssmkit.models import CausalLM  # noqa: E402
from tests.interop.hybrid_checks import (  # noqa: E402
    check_directory_round_trip,
    chunked_logits,
    logits,
    max_err,
    quiet_one_thread,
    tokens,
)
from tests.layers.contract import assert_close  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    with quiet_one_thread():
        yield


def recurrent_gemma(seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny random RecurrentGemmaForCausalLM. Its norm weights w are put on a 2^-10 grid: ssmkit's norms store
    the scale 1 + w, which then has an exact float32 form (as for any bfloat16 checkpoint), so the weights round
    trip bit for bit (the function is equal either way; test_norm_shift_* cover the other cases)."""
    kw = {"hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 1, "attention_window_size": 4, **kw}
    torch.manual_seed(seed)
    hf = randomise(transformers.RecurrentGemmaForCausalLM(
        transformers.RecurrentGemmaConfig(vocab_size=VOCAB, **{**NO_TOKENS, **kw})), seed)
    with torch.no_grad():
        for k, t in hf.state_dict().items():
            if k.endswith("norm.weight"):
                t.copy_((t * 2 ** 10).round() / 2 ** 10)
    return hf


MODELS = {
    # MQA, block_types (recurrent, recurrent, attention), half-rotary heads, tied, sqrt(48) -> 6.9375 in bfloat16
    "rg": lambda: recurrent_gemma(),
    # GQA first, lru_width != hidden_size, conv width 2, attention biases, exact gelu, quarter rotary, untied,
    # a soft cap that bites
    "rg-gqa-untied": lambda: recurrent_gemma(
        1, hidden_size=32, lru_width=24, num_hidden_layers=4, block_types=["attention", "recurrent"],
        num_key_value_heads=2, attention_window_size=3, conv1d_width=2, attention_bias=True, hidden_activation="gelu",
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 300.0,
                                                    "partial_rotary_factor": 0.25},
        rms_norm_eps=1e-4, logits_soft_cap=2.0, intermediate_size=36),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_and_round_trips_are_exact(name):
    hf = MODELS[name]()
    ours = from_transformers(hf)
    x = tokens(2, 13, seed=1)
    assert max_err(logits(ours, x), logits(hf, x)) <= TOL
    back = to_transformers(ours)  # no family given: the one family that fits
    assert type(back) is type(hf)
    assert back.config.to_dict() == hf.config.to_dict()
    theirs = hf.state_dict()
    assert back.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[k]) for k, t in back.state_dict().items())
    again = from_transformers(back)
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(),
                                                   strict=True))


@pytest.mark.parametrize("name, change", [("rg", {"embedding_multiplier": 48 ** 0.5}),
                                          ("rg-gqa-untied", {"logits_soft_cap": None})])
def test_the_bfloat16_embedding_scale_and_the_soft_cap_matter(name, change):
    hf = MODELS[name]()
    ours = from_transformers(hf)
    assert ours.config.embedding_multiplier == {"rg": 6.9375, "rg-gqa-untied": 5.65625}[name]  # bfloat16 sqrt
    x = tokens(2, 9, seed=6)
    want = logits(hf, x)
    if name == "rg-gqa-untied":
        assert 1.5 < want.abs().max() <= 2.0  # capped at 2
    other = CausalLM(ours.config.replace(**change))
    other.load_state_dict(ours.state_dict())
    assert max_err(logits(other.eval(), x), want) > 10 * TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_logits(name):
    hf = MODELS[name]().double()
    ours = from_transformers(hf)
    assert ours.lm_head.weight.dtype == torch.float64
    x = tokens(2, 11, seed=2)
    # transformers computes its norms, rotary angles and the RG-LRU scan in float32
    assert max_err(logits(ours, x), logits(hf, x)) <= TOL
    assert to_transformers(ours).lm_head.weight.dtype == torch.float64


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_transformers_generate(name):
    hf = MODELS[name]()
    ours = from_transformers(hf)
    prompt = tokens(2, 5, seed=3)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                           min_new_tokens=30)[:, prompt.shape[1]:]
    assert torch.equal(generate(ours, prompt, 30), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_chunks_and_steps_equal_the_full_forward(name):
    ours = from_transformers(MODELS[name]()).double()
    x = tokens(2, 16, seed=4)  # 4x the attention window
    full = logits(ours, x)
    assert_close(chunked_logits(ours, x), full, 1e-10, f"{name} chunked")  # chunks through the cache, steps


def test_directories_round_trip(tmp_path):
    check_directory_round_trip(MODELS["rg"](), tmp_path, TOL)


def test_norm_shift_is_exact_or_an_error():
    hf = MODELS["rg"]()
    with torch.no_grad():  # a weight whose 1 + w has no float32 form: the function is still equal
        hf.model.final_norm.weight[0] = 2.0 ** -30
    ours = from_transformers(hf)
    x = tokens(2, 7, seed=7)
    assert max_err(logits(ours, x), logits(hf, x)) <= TOL
    with pytest.raises(ValueError, match=r"^RecurrentGemma: the norm scale 1 \+ w of backbone.blocks.0.norm.weight has "
                                         r"no exact torch.bfloat16 form") as e:
        from_transformers(MODELS["rg"]().bfloat16())
    assert "\n" not in str(e.value)
    with torch.no_grad():
        ours.backbone.blocks[2].norm.weight[1] = 0.1  # s - 1 = -0.9 loses s's last bits in float32
    with pytest.raises(ValueError, match=r"^to_transformers: RecurrentGemma stores a norm as w and scales by 1 \+ w; "
                                         r"the scale of model.layers.1.temporal_pre_norm.weight is not exactly"):
        to_transformers(ours)


def hf_with(**kw):
    return lambda: recurrent_gemma(**kw)


@pytest.mark.parametrize("make, match", [
    (hf_with(hidden_activation="tanh"), r"RecurrentGemma: config option hidden_activation='tanh' is not supported"),
    (hf_with(attention_dropout=0.1), r"RecurrentGemma: config option attention_dropout=0.1 is not supported"),
    (hf_with(lru_width=30), r"RecurrentGemma: config option lru_width=30 is not supported by ssmkit \(expected a "
                            r"multiple of num_attention_heads=4\)"),
    (hf_with(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     r"RecurrentGemma: config option rope_parameters\['partial_rotary_factor'\]=0.25 is not supported by ssmkit "
     r"\(expected a factor giving an even rotary width\)"),  # 12 * 0.25 = 3 channels
])
def test_unsupported_transformers_options_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        from_transformers(make())
    assert "\n" not in str(e.value)


def _ours(**changes) -> CausalLM:
    cfg = from_transformers(MODELS["rg"]()).config
    return CausalLM(cfg.replace(**changes))


@pytest.mark.parametrize("make, match", [
    (lambda: _ours(embedding_multiplier=1.0), r"scales embeddings by sqrt\(d_model\) in bfloat16 = 6.9375, got "
                                              r"config.embedding_multiplier=1.0"),
    (lambda: _ours(logits_soft_cap=None), r"config.logits_soft_cap must be set"),
    (lambda: _ours(mixer_options={**_ours().config.mixer_options, "griffin": {
        **_ours().config.mixer_options["griffin"], "act": "silu"}}), r"one hidden_activation and c=8"),
    (lambda: _ours(mixer_options={**_ours().config.mixer_options, "local-gqa": {
        **_ours().config.mixer_options["local-gqa"], "out_bias": False}}), r"an o_proj bias"),
    (lambda: _ours(mixer_options={**_ours().config.mixer_options, "local-gqa": {
        **_ours().config.mixer_options["local-gqa"], "n_heads": 2, "head_dim": 24}}),
     r"one num_attention_heads for gate blocks and attention, got \[2, 4\]"),
])
def test_models_transformers_cannot_hold_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        to_transformers(make(), family="recurrent_gemma")
    assert "\n" not in str(e.value)

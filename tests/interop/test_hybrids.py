"""transformers' hybrid families (FalconMamba, Bamba, NemotronH, Jamba, GraniteMoeHybrid, FalconH1) against ssmkit:
logits within 1e-4 of transformers' own CPU forward (float32 and float64), 30 greedy tokens identical to transformers'
cached ``generate``, chunked cached forwards and steps equal to one full forward, exact round trips (objects and
directories), and one-line errors for options ssmkit does not implement. Never touches the hub."""

from __future__ import annotations

import pytest
import torch

from tests.interop.hybrid_models import HF_MODELS, VOCAB, bamba, falcon_h1, falcon_mamba, granite, jamba, nemotron_h

transformers = pytest.importorskip("transformers")

from ssmkit.infer import generate  # noqa: E402
from ssmkit.interop import from_transformers, to_transformers  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig  # noqa: E402
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


def uses_moe(model: CausalLM) -> bool:
    return "moe" in model.backbone.mixer_names


# config fields transformers does not read for that model (so ssmkit cannot recover them)
UNUSED_FIELDS = {"granite-dense-rope-tied": {"intermediate_size"}}  # the experts' width, without experts


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_logits_match_and_round_trips_are_exact(name):
    hf = HF_MODELS[name]()
    ours = from_transformers(hf)
    x = tokens(2, 13, seed=1)
    assert max_err(logits(ours, x), logits(hf, x)) <= TOL
    back = to_transformers(ours)  # no family given: the one family that fits
    assert type(back) is type(hf)
    unused = UNUSED_FIELDS.get(name, set())
    assert {k: v for k, v in back.config.to_dict().items() if k not in unused} == {
        k: v for k, v in hf.config.to_dict().items() if k not in unused}
    theirs = hf.state_dict()
    assert back.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[k]) for k, t in back.state_dict().items())
    again = from_transformers(back)
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(),
                                                   strict=True))


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_float64_logits(name):
    hf = HF_MODELS[name]().double()
    ours = from_transformers(hf)
    assert ours.lm_head.weight.dtype == torch.float64
    if uses_moe(ours):
        hf.set_experts_implementation("eager")  # transformers' grouped-mm experts take no float64
    x = tokens(2, 11, seed=2)
    # transformers computes parts (A, rotary angles, FalconMamba's norms, router softmax) in float32
    assert max_err(logits(ours, x), logits(hf, x)) <= TOL
    assert to_transformers(ours).lm_head.weight.dtype == torch.float64


# transformers 5.25's one-token Mamba-2 step (mamba2_selective_state_update, Bamba and NemotronH) ignores
# time_step_limit, which its chunked forward applies: with a limit, its cached decode drifts from its own full
# forward (logits off by 6e-2 and 2e-1 here). For these configs the reference is transformers' uncached generate.
HF_CACHED_DECODE_WRONG = {"bamba-bias-tied-mha", "nemotron_h-groups-bias"}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_greedy_generation_matches_transformers_generate(name):
    hf = HF_MODELS[name]()
    ours = from_transformers(hf)
    prompt = tokens(2, 5, seed=3)
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                           min_new_tokens=30, use_cache=name not in HF_CACHED_DECODE_WRONG)[:, prompt.shape[1]:]
    assert torch.equal(generate(ours, prompt, 30), want)


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_cached_chunks_and_steps_equal_the_full_forward(name):
    ours = from_transformers(HF_MODELS[name]()).double()
    x = tokens(2, 16, seed=4)
    full = logits(ours, x)
    assert_close(chunked_logits(ours, x), full, 1e-10, f"{name} chunked")  # chunks through the cache, steps


def test_directories_round_trip(tmp_path):
    check_directory_round_trip(HF_MODELS["nemotron_h"](), tmp_path, TOL)


@pytest.mark.parametrize("make, match", [
    (lambda: falcon_mamba(hidden_act="gelu"), r"FalconMamba: config option hidden_act='gelu' is not supported"),
    (lambda: bamba(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     r"Bamba: config option rope_parameters\['rope_type'\]='linear' is not supported"),
    (lambda: nemotron_h(moe_latent_size=8), r"NemotronH: config option moe_latent_size=8 is not supported"),
    (lambda: nemotron_h(mamba_hidden_act="gelu"), r"NemotronH: config option mamba_hidden_act='gelu'"),
    (lambda: nemotron_h(mlp_hidden_act="tanh"), r"NemotronH: config option mlp_hidden_act='tanh'"),
    (lambda: jamba(hidden_act="relu"), r"Jamba: config option hidden_act='relu' is not supported"),
    (lambda: falcon_h1(projectors_bias=True), r"FalconH1: config option projectors_bias=True is not supported"),
    (lambda: granite(position_embedding_type="alibi"),
     r"GraniteMoeHybrid: config option position_embedding_type='alibi' is not supported"),
])
def test_unsupported_transformers_options_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        from_transformers(make())
    assert "\n" not in str(e.value)


def _ours(pattern: str, **opts) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(d_model=8, vocab_size=VOCAB, pattern=pattern, mixer_options=opts))


@pytest.mark.parametrize("make, family, match", [
    (lambda: _ours("mamba2,ffn", ffn={"act": "relu2"}), "bamba", r"ffn must be gated silu in Bamba"),
    (lambda: _ours("mamba2,gqa"), "bamba", r"pattern must be \(one of \('mamba2', 'gqa'\), then one of"),
    (lambda: _ours("mamba2,ffn", ffn={"gated": False}), "nemotron_h", r"never ties lm_head"),
    (lambda: _ours("gqa,ffn,normed-mamba,ffn,gqa,ffn,gqa,ffn", **{"normed-mamba": {"bcdt_weights": True}}),
     "jamba", r"attention layers \[0, 2, 3\] are not periodic"),
    (lambda: _ours("normed-mamba", **{"normed-mamba": {"bcdt_weights": True}}), "falcon_mamba",
     r"bcdt_weights=True \(that is Jamba\)"),
    (lambda: _ours("mamba2,ffn,attn,ffn"), None, r"pattern must be all 'mamba' or all 'mamba2'.*pass family="),
])
def test_models_transformers_cannot_hold_fail_in_one_line(make, family, match):
    with pytest.raises(ValueError, match=match) as e:
        to_transformers(make(), family=family)
    assert "\n" not in str(e.value)


def test_model_multipliers_are_validated_and_honoured_when_stepping():
    with pytest.raises(ValueError, match=r"ModelConfig: residual_multiplier must be a number in \(0.0, 1000000.0\]"):
        ModelConfig(d_model=8, vocab_size=VOCAB, residual_multiplier=0)
    torch.manual_seed(0)
    # a pure-Mamba model would take the fused decode kernel, which has no multipliers: stepping must not use it
    model = CausalLM(ModelConfig(d_model=8, vocab_size=VOCAB, pattern="mamba*2", embedding_multiplier=2.0,
                                 residual_multiplier=0.5, logits_scaling=3.0)).double()
    plain = CausalLM(ModelConfig(d_model=8, vocab_size=VOCAB, pattern="mamba*2")).double()
    plain.load_state_dict(model.state_dict())
    x = tokens(2, 6, seed=9)
    with torch.no_grad():
        full = model(x).logits
        state, steps = model.init_state(2), []
        for t in range(6):
            lg, state = model.step(x[:, t], state)
            steps.append(lg)
        assert_close(torch.stack(steps, 1), full, 1e-10, "multipliers: steps vs forward")
        assert max_err(full, plain(x).logits) > 1e-3  # the multipliers change the function

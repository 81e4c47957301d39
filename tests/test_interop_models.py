"""Whole-model conversion between ssmkit CausalLM and transformers' MambaForCausalLM / Mamba2ForCausalLM: logits
match transformers' own CPU forward, greedy generations are identical, and round trips (objects and saved
directories) are exact. Never touches the hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ssmkit.infer import generate  # noqa: E402
from ssmkit.interop.models import from_transformers, to_transformers  # noqa: E402
from ssmkit.models import CausalLM, ModelConfig, PrefixLM  # noqa: E402
from tests.layers.contract import assert_close  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM  # noqa: E402

TOL = 1e-4
VOCAB = 32
NO_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # nothing stops generation early


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than the work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield
    torch.set_num_threads(n)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its default so that a swapped or missed weight shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def hf_mamba(seed: int = 0, **kw) -> MambaForCausalLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, **{**NO_TOKENS, **kw})
    model = MambaForCausalLM(cfg).eval()
    randomise(model, seed)
    return model


def hf_mamba2(ngroups: int = 1, seed: int = 0, **kw) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Mamba2Config(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, num_heads=8,
                       head_dim=4, n_groups=ngroups, chunk_size=4, **{**NO_TOKENS, **kw})
    model = Mamba2ForCausalLM(cfg).eval()
    randomise(model, seed)
    return model


HF_MODELS = {
    "mamba": lambda: hf_mamba(),
    "mamba-bias-untied": lambda: hf_mamba(1, use_bias=True, use_conv_bias=False, expand=3,
                                          tie_word_embeddings=False, layer_norm_epsilon=1e-3),
    "mamba2-g1": lambda: hf_mamba2(1),
    "mamba2-g2-tied": lambda: hf_mamba2(2, seed=2, tie_word_embeddings=True),
    "mamba2-g2-dt-limit": lambda: hf_mamba2(2, seed=2, time_step_limit=(0.01, 0.5)),
    "mamba2-g4-untied": lambda: hf_mamba2(4, seed=3, layer_norm_epsilon=1e-4),
}


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_from_transformers_matches_logits_and_round_trips_exactly(name):
    hf = HF_MODELS[name]()
    ours = from_transformers(hf)
    cfg = ours.config
    assert type(ours) is CausalLM and not ours.training
    assert cfg.pattern == [hf.config.model_type] * 2 and cfg.norm == "rmsnorm" and cfg.mlp == "none"
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings and cfg.norm_eps == hf.config.layer_norm_epsilon
    x = tokens(2, 11)
    want = hf_logits(hf, x)
    with torch.no_grad():
        got = ours(x).logits
    assert_close(got, want, TOL, f"{name} logits")
    # HF -> ssmkit -> HF: the same weights and config, so transformers computes bit-identical logits
    back = to_transformers(ours)
    assert type(back) is type(hf)
    assert torch.equal(hf_logits(back, x), want)
    want_sd, back_sd = hf.state_dict(), back.state_dict()
    assert set(want_sd) == set(back_sd) and all(torch.equal(want_sd[k], back_sd[k]) for k in want_sd)
    for key in ("hidden_size", "state_size", "expand", "conv_kernel", "time_step_rank", "layer_norm_epsilon",
                "vocab_size", "tie_word_embeddings", "use_bias", "use_conv_bias", "residual_in_fp32",
                "n_groups", "head_dim", "num_heads", "chunk_size", "time_step_limit"):
        if hasattr(hf.config, key):
            assert getattr(back.config, key) == getattr(hf.config, key), key


@pytest.mark.parametrize("seed", range(3))
def test_every_config_field_round_trips(seed):
    """transformers -> ssmkit -> transformers keeps every config field but the token ids (which ssmkit does not
    hold), including Mamba-2's time_step_rank, which no Mamba-2 computation reads."""
    g = torch.Generator().manual_seed(seed)
    pick = (lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))])  # noqa: E731
    heads, groups = pick(4, 8), pick(1, 2, 4)
    common = dict(hidden_size=16, state_size=pick(2, 4), num_hidden_layers=pick(1, 2), vocab_size=VOCAB,
                  time_step_rank=(7, 3, "auto")[seed], conv_kernel=pick(2, 4), layer_norm_epsilon=pick(1e-5, 1e-3),
                  tie_word_embeddings=pick(True, False), use_bias=pick(True, False))
    for cls, cfg in ((MambaForCausalLM, MambaConfig(**common)),
                     (Mamba2ForCausalLM, Mamba2Config(**common, num_heads=heads, head_dim=32 // heads,
                                                      n_groups=groups, chunk_size=pick(4, 256)))):
        back = to_transformers(from_transformers(cls(cfg).eval())).config.to_dict()
        want = cfg.to_dict()
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            want.pop(key), back.pop(key)
        assert back == want, {k: (want.get(k), back.get(k)) for k in set(want) | set(back)
                              if want.get(k) != back.get(k)}


@pytest.mark.parametrize("name", ["mamba-bias-untied", "mamba2-g2-tied"])
def test_greedy_generation_is_identical_to_transformers_generate(name):
    hf = HF_MODELS[name]()
    ours = from_transformers(hf)
    x = tokens(2, 6, seed=1)
    with torch.no_grad():
        want = hf.generate(x, max_new_tokens=32, do_sample=False, use_cache=True)[:, x.shape[1]:]
    got = generate(ours, x, 32, temperature=0)
    assert want.shape == (2, 32)
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 4  # a non-degenerate continuation


def test_dt_limit_generation_follows_the_full_forward():
    """transformers' cached one-token Mamba-2 step (its reference path) does not clamp dt to time_step_limit while
    its chunked forward does, so its generate drifts from its own forward for such configs. Ours clamps in both;
    its greedy output equals re-running transformers' full forward at every step."""
    hf = HF_MODELS["mamba2-g2-dt-limit"]()
    ours = from_transformers(hf)
    x = tokens(2, 6, seed=1)
    seq = x
    for _ in range(32):
        seq = torch.cat([seq, hf_logits(hf, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(ours, x, 32, temperature=0), seq[:, x.shape[1]:])


def test_saved_directory_round_trip(tmp_path):
    hf = HF_MODELS["mamba2-g2-dt-limit"]()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_transformers(tmp_path / "hf")  # transformers reads it, offline
    ours_str = from_transformers(str(tmp_path / "hf"))
    x = tokens(2, 9, seed=2)
    want = hf_logits(hf, x)
    with torch.no_grad():
        assert_close(ours(x).logits, want, TOL, "from a saved directory")
        assert torch.equal(ours(x).logits, ours_str(x).logits)
    back = to_transformers(ours)
    back.save_pretrained(tmp_path / "back")
    reloaded = Mamba2ForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert torch.equal(hf_logits(reloaded, x), want)
    # and through ssmkit's own checkpoint format
    ours.save_pretrained(tmp_path / "ssmkit")
    assert torch.equal(hf_logits(to_transformers(tmp_path / "ssmkit"), x), want)


@pytest.mark.parametrize("pattern,opts,tie", [
    ("mamba", {"mamba": {"d_state": 4, "dt_rank": 3, "bias": True}}, True),
    ("mamba2", {"mamba2": {"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 8}}, False),
])
def test_ssmkit_model_to_transformers_and_back(pattern, opts, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=3, pattern=pattern, vocab_size=VOCAB, mixer_options=opts,
                      tie_embeddings=tie)
    ours = CausalLM(cfg).eval()
    randomise(ours, 5)
    hf = to_transformers(ours, eos_token_id=3)
    assert hf.config.eos_token_id == 3 and hf.config.tie_word_embeddings == tie
    x = tokens(2, 10, seed=3)
    with torch.no_grad():
        want = ours(x).logits
    assert_close(hf_logits(hf, x), want, TOL, f"{pattern} ssmkit -> transformers")
    again = from_transformers(hf)
    a, b = again.config.to_dict(), ours.config.to_dict()
    a_opts, b_opts = a.pop("mixer_options")[pattern], b.pop("mixer_options")[pattern]
    assert a == b
    assert all(a_opts[k] == v for k, v in b_opts.items())  # every option given, plus the defaults spelled out
    assert [blk.mixer.extra_repr() for blk in again.backbone.blocks] == [
        blk.mixer.extra_repr() for blk in ours.backbone.blocks]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(),
                                                   strict=True))


def test_conversion_keeps_dtype():
    hf = HF_MODELS["mamba"]().double()
    ours = from_transformers(hf)
    assert ours.lm_head.weight.dtype == torch.float64
    x = tokens(1, 7)
    with torch.no_grad():
        assert_close(ours(x).logits, hf_logits(hf, x), 1e-6, "float64")  # transformers keeps A in float32
    assert to_transformers(ours).lm_head.weight.dtype == torch.float64


def test_unsupported_models_and_inputs_fail_clearly(tmp_path):
    torch.manual_seed(0)
    small = dict(d_model=8, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"pattern must be all 'mamba' or all 'mamba2', got \['mamba', 'mamba2'\]"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba,mamba2", **small)))
    with pytest.raises(ValueError, match=r"pattern must be all 'mamba' or all 'mamba2'.*'attn'"):
        to_transformers(CausalLM(ModelConfig(pattern="attn", **small)))
    with pytest.raises(ValueError, match=r"config.mlp must be 'none'"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba", mlp="swiglu", **small)))
    with pytest.raises(ValueError, match=r"config.norm must be 'rmsnorm'"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba", norm="layernorm", **small)))
    with pytest.raises(ValueError, match=r"config.dropout must be 0"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba", dropout=0.1, **small)))
    with pytest.raises(ValueError, match=r"gated norm eps .* must equal config.norm_eps"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba2", mixer_options={"mamba2": {"norm_eps": 1e-3}},
                                             **small)))
    with pytest.raises(ValueError, match=r"config_overrides cannot set hidden_size: they are derived"):
        to_transformers(CausalLM(ModelConfig(pattern="mamba", **small)), hidden_size=4)
    with pytest.raises(TypeError, match=r"must be an ssmkit CausalLM \(exactly.*got PrefixLM"):
        to_transformers(PrefixLM(ModelConfig(pattern="mamba", **small)))
    with pytest.raises(TypeError, match=r"MambaForCausalLM or Mamba2ForCausalLM .* got MambaModel"):
        from_transformers(hf_mamba().backbone)
    with pytest.raises(FileNotFoundError, match="never the hub"):
        from_transformers("state-spaces/mamba-130m-hf")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported"):
        from_transformers(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        from_transformers(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_act='gelu'; ssmkit supports only 'silu'"):
        from_transformers(hf_mamba(hidden_act="gelu"))

"""ssmkit.interop against transformers' MambaMixer / Mamba2Mixer: weights map one to one and the functions
agree, on the full sequence (transformers' torch path) and in the cached one-token path after a prefill."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssmkit.interop import (
    copy_mixer_to_transformers,
    load_into_transformers_mixer,
    mamba2_from_transformers_mixer,
    mamba_from_transformers_mixer,
    mixer_from_transformers,
    mixer_to_transformers,
)
from ssmkit.layers import Mamba, Mamba2
from tests.layers.contract import assert_close

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, Mamba2Config, Mamba2Model, MambaConfig, MambaModel  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its (often symmetric) default so a swapped or missed weight shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def mamba_model(seed: int = 0, **kw) -> MambaModel:
    torch.manual_seed(seed)
    cfg = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=11, **kw)
    model = MambaModel(cfg).eval()
    randomise(model, seed)
    return model


def mamba2_model(ngroups: int, seed: int = 0, **kw) -> Mamba2Model:
    torch.manual_seed(seed)
    cfg = Mamba2Config(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=11, num_heads=8,
                       head_dim=4, n_groups=ngroups, chunk_size=4, **kw)
    model = Mamba2Model(cfg).eval()
    randomise(model, seed)
    return model


def compare_full_and_cached(model, layers, x: torch.Tensor, prefill: int) -> None:
    """Each mixer vs our layer: the whole sequence, then a cached prefill followed by one-token steps."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mixer = model.layers[i].mixer
            assert_close(layer(x), mixer(x), TOL, f"layer {i} full sequence")
            y_pre = mixer(x[:, :prefill], cache_params=cache)
            ours_pre, state = layer(x[:, :prefill], return_final_state=True)
            assert_close(ours_pre, y_pre, TOL, f"layer {i} prefill")
            for t in range(prefill, x.shape[1]):
                y_t = mixer(x[:, t:t + 1], cache_params=cache)[:, 0]
                ours_t, state = layer.step(x[:, t], state)
                assert_close(ours_t, y_t, TOL, f"layer {i} cached step at t={t}")


# ------------------------------------------------------------------------------------------ Mamba
@pytest.mark.parametrize("kw", [{}, {"use_bias": True, "use_conv_bias": False, "expand": 3}])
def test_mamba_matches_transformers_mixer(kw):
    model = mamba_model(1, **kw)
    layers = [mixer_from_transformers(block.mixer) for block in model.layers]
    assert all(isinstance(layer, Mamba) for layer in layers)
    assert set(layers[0].state_dict()) == set(model.layers[0].mixer.state_dict())
    x = torch.randn(2, 11, 16)
    compare_full_and_cached(model, layers, x, prefill=6)


def test_mamba_prefill_shorter_than_conv_width():
    model = mamba_model(2)
    layers = [mixer_from_transformers(block.mixer) for block in model.layers]
    compare_full_and_cached(model, layers, torch.randn(1, 6, 16), prefill=2)


def test_mamba_round_trip_into_a_fresh_mixer():
    torch.manual_seed(3)
    layer = Mamba(16, d_state=4)
    randomise(layer, 3)
    model = mamba_model(4)
    mixer = copy_mixer_to_transformers(layer, model.layers[0].mixer)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert_close(mixer(x), layer(x), TOL, "ours loaded into transformers")
    back = mixer_from_transformers(mixer)
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_mamba_mismatches_are_listed():
    model = mamba_model(5)
    with pytest.raises(ValueError, match="d_state: layer 5 vs mixer 4"):
        copy_mixer_to_transformers(Mamba(16, d_state=5), model.layers[0].mixer)
    with pytest.raises(ValueError, match="out_proj.bias"):
        copy_mixer_to_transformers(Mamba(16, d_state=4, bias=True), model.layers[0].mixer)
    with pytest.raises(ValueError, match="reverse"):
        copy_mixer_to_transformers(Mamba(16, d_state=4, reverse=True), model.layers[0].mixer)
    with pytest.raises(TypeError, match="Mamba2Mixer"), pytest.warns(DeprecationWarning):
        mamba2_from_transformers_mixer(model.layers[0].mixer)
    with pytest.raises(TypeError, match="MambaMixer or Mamba2Mixer"):
        mixer_from_transformers(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ Mamba-2
@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_matches_transformers_mixer(ngroups):
    model = mamba2_model(ngroups, seed=ngroups)
    layers = [mixer_from_transformers(block.mixer) for block in model.layers]
    assert all(isinstance(layer, Mamba2) and layer.ngroups == ngroups for layer in layers)
    assert set(layers[0].state_dict()) == set(model.layers[0].mixer.state_dict())
    x = torch.randn(2, 10, 16)  # 10 is not a multiple of chunk_size=4
    compare_full_and_cached(model, layers, x, prefill=5)


def test_mamba2_round_trip_and_group_mismatch():
    torch.manual_seed(6)
    layer = Mamba2(16, d_state=4, headdim=4, ngroups=2)
    randomise(layer, 6)
    model = mamba2_model(2, seed=7)
    mixer = copy_mixer_to_transformers(layer, model.layers[1].mixer)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert_close(mixer(x), layer(x), TOL, "ours loaded into transformers")
    # same parameter shapes (ngroups * d_state = 8), different function: must be refused by name
    other = Mamba2(16, d_state=8, headdim=4, ngroups=1)
    mixer_shapes = {k: v.shape for k, v in model.layers[1].mixer.state_dict().items()}
    assert {k: v.shape for k, v in other.state_dict().items()} == mixer_shapes
    with pytest.raises(ValueError, match="ngroups: layer 1 vs mixer 2"):
        copy_mixer_to_transformers(other, model.layers[1].mixer)
    with pytest.raises(ValueError, match="headdim"):
        copy_mixer_to_transformers(Mamba2(16, d_state=4, headdim=8, ngroups=2), model.layers[1].mixer)


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mixer_to_transformers_builds_an_equal_mixer(kind):
    torch.manual_seed(8)
    layer = Mamba(16, d_state=4, expand=3) if kind == "mamba" else Mamba2(16, d_state=4, headdim=4, ngroups=2)
    randomise(layer, 8)
    mixer = mixer_to_transformers(layer)
    assert type(mixer).__name__ == ("MambaMixer" if kind == "mamba" else "Mamba2Mixer") and not mixer.training
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert_close(mixer(x), layer(x), TOL, f"{kind} -> new transformers mixer")
    back = mixer_from_transformers(mixer)
    assert type(back) is type(layer)
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ValueError, match="reverse"):
        mixer_to_transformers(type(layer)(16, d_state=4, reverse=True))
    with pytest.raises(TypeError, match="Mamba or Mamba2"):
        mixer_to_transformers(torch.nn.Linear(2, 2))


def test_deprecated_mixer_names_warn_and_agree():
    model, model2 = mamba_model(9), mamba2_model(2, seed=9)
    pairs = [(mamba_from_transformers_mixer, model.layers[0].mixer),
             (mamba2_from_transformers_mixer, model2.layers[0].mixer)]
    for old, mixer in pairs:
        with pytest.warns(DeprecationWarning, match=f"{old.__name__} is deprecated; use mixer_from_transformers"):
            layer = old(mixer)
        new = mixer_from_transformers(mixer)
        for k, v in new.state_dict().items():
            assert torch.equal(layer.state_dict()[k], v), k
    with pytest.raises(TypeError, match="must be a transformers MambaMixer"), pytest.warns(DeprecationWarning):
        mamba_from_transformers_mixer(model2.layers[0].mixer)
    layer = mixer_from_transformers(model.layers[1].mixer)
    with pytest.warns(DeprecationWarning, match="load_into_transformers_mixer is deprecated; use copy_mixer_to_"):
        out = load_into_transformers_mixer(layer, model.layers[0].mixer)
    assert out is model.layers[0].mixer
    assert torch.equal(out.out_proj.weight, layer.out_proj.weight)

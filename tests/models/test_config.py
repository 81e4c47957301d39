"""ModelConfig: validation, spec parsing, serialisation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.models import ModelConfig, compress_pattern, mixer_names, parse_pattern


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 8, "vocab_size": 10, **kw})


# ----------------------------------------------------------------------------------------------- patterns
def test_parse_hybrid_spec():
    c = cfg(pattern="mamba2*3,attn,mamba2*3")
    assert c.pattern == ["mamba2"] * 3 + ["attn"] + ["mamba2"] * 3
    assert c.n_layers == 7


def test_parse_groups_and_whitespace():
    assert parse_pattern(" (gated , attn)*2, mamba ") == ["gated", "attn", "gated", "attn", "mamba"]
    assert parse_pattern("((s4d*2,attn)*2,h3)") == ["s4d", "s4d", "attn", "s4d", "s4d", "attn", "h3"]
    assert parse_pattern("prefix-gated*2") == ["prefix-gated", "prefix-gated"]


@pytest.mark.parametrize("spec", ["mamba*0", "mamba*", "(mamba", "mamba,,attn", "mamba)", "*3", "mamba*2x",
                                  "mamba attn", "mamba;attn", ""])
def test_parse_errors(spec):
    with pytest.raises(ValueError, match="pattern"):
        cfg(pattern=spec)


def test_unknown_mixer_lists_valid_names():
    with pytest.raises(ValueError, match="unknown mixer 'mambo'.*mamba2.*rglru"):
        cfg(pattern="mamba*2,mambo")
    with pytest.raises(ValueError, match="unknown mixer 'x'"):
        cfg(pattern=["mamba", "x"])


def test_layer_count_rules():
    assert cfg(pattern="gated", n_layers=3).pattern == ["gated"] * 3  # a bare name repeats
    assert cfg(pattern=["gated"], n_layers=2).pattern == ["gated"] * 2
    assert cfg(pattern="gated").n_layers == 1
    assert cfg(pattern="gated*3", n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="n_layers"):
        cfg(pattern="gated*3", n_layers=4)
    with pytest.raises(ValueError, match="n_layers"):
        cfg(pattern=["gated", "attn"], n_layers=4)


@given(st.lists(st.sampled_from(["mamba", "attn", "gated", "s4d"]), min_size=1, max_size=12))
def test_compress_parse_round_trip(names):
    spec = compress_pattern(names)
    assert parse_pattern(spec) == names
    assert len(spec.split(",")) <= len(names)


# ----------------------------------------------------------------------------------------------- values
def test_exactly_one_input_kind():
    with pytest.raises(ValueError, match="vocab_size/d_input"):
        ModelConfig(d_model=8)
    with pytest.raises(ValueError, match="vocab_size/d_input"):
        ModelConfig(d_model=8, vocab_size=10, d_input=3)
    assert ModelConfig(d_model=8, d_input=3).vocab_size is None


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("norm", "batchnorm", "norm.*'rmsnorm', 'layernorm'"),
        ("mlp", "relu", "mlp.*'none', 'gelu', 'swiglu'"),
        ("pooling", "max", "pooling.*'mean', 'last'"),
        ("d_model", 0, "d_model"),
        ("d_model", True, "d_model"),
        ("d_model", 8.0, "d_model"),
        ("n_layers", -1, "n_layers"),
        ("dropout", 1.0, "dropout"),
        ("dropout", -0.1, "dropout"),
        ("mlp_ratio", 0, "mlp_ratio"),
        ("norm_eps", 0.0, "norm_eps"),
        ("tie_embeddings", 1, "tie_embeddings"),
        ("residual_in_fp32", "yes", "residual_in_fp32"),
        ("num_classes", 1, "num_classes"),
        ("d_output", 0, "d_output"),
        ("vocab_size", 0, "vocab_size"),
        ("init_std", float("nan"), "init_std"),
        ("prefix_layers", "every", "prefix_layers.*'alternate'"),
        ("prefix_layers", [0, 5], "prefix_layers"),
        ("prefix_layers", [1, 1], "prefix_layers"),
        ("pattern", 3, "pattern"),
        ("pattern", [], "pattern"),
    ],
)
def test_bad_values_name_the_field(field, value, expect):
    with pytest.raises(ValueError, match=expect):
        cfg(**{"pattern": "gated*2", field: value})


def test_mixer_options_validation():
    c = cfg(pattern="mamba", mixer_options={"mamba": {"d_state": 4, "expand": 1}})
    assert c.mixer_options == {"mamba": {"d_state": 4, "expand": 1}}
    with pytest.raises(ValueError, match=r"mixer_options\['mamba'\].*'d_stat'.*d_state"):
        cfg(mixer_options={"mamba": {"d_stat": 4}})
    with pytest.raises(ValueError, match="mixer_options.*unknown mixer 'mambo'"):
        cfg(mixer_options={"mambo": {}})
    with pytest.raises(ValueError, match=r"mixer_options\['gated'\]"):
        cfg(mixer_options={"gated": 3})
    for reserved in ("d_model", "reverse", "dtype"):
        with pytest.raises(ValueError, match=f"'{reserved}'"):
            cfg(mixer_options={"gated": {reserved: 4}})
    with pytest.raises(ValueError, match=r"mixer_options\['prefix-attn'\].*'mask'"):
        cfg(mixer_options={"prefix-attn": {"mask": "causal"}})
    with pytest.raises(ValueError, match="JSON-compatible"):
        cfg(mixer_options={"gated": {"f_init": object()}})
    assert cfg(mixer_options={"bi-mamba": {"combine": "concat"}}).mixer_options["bi-mamba"] == {
        "combine": "concat"
    }


def test_prefix_layers_resolution():
    c = cfg(pattern="gated,attn,mamba,s4d")
    assert c.resolved_pattern("alternate") == ["prefix-gated", "attn", "prefix-mamba", "s4d"]
    assert c.resolved_pattern("none") == c.pattern
    assert cfg(pattern="gated,attn", prefix_layers="all").resolved_pattern() == ["prefix-gated", "prefix-attn"]
    assert cfg(pattern="gated*3", prefix_layers=[2, 0]).prefix_layers == [0, 2]
    with pytest.raises(ValueError, match="prefix_layers.*layer 0 .*'mamba2'"):
        cfg(pattern="mamba2,gated", prefix_layers="alternate")
    with pytest.raises(ValueError, match="prefix_layers.*layer 1 .*'bi-gated'"):
        cfg(pattern="gated,bi-gated", prefix_layers=[1])
    with pytest.raises(ValueError, match="prefix_layers"):  # a head's default is checked when resolved
        cfg(pattern="h3").resolved_pattern("alternate")


def test_every_mixer_name_is_accepted():
    for name in mixer_names():
        assert cfg(pattern=name).pattern == [name]


# ----------------------------------------------------------------------------------------------- serialisation
def test_dict_and_json_round_trip():
    c = cfg(pattern="(mamba2*2,attn)*2", mixer_options={"gated": {"f_init": (0.8, 0.9)}, "attn": {"n_heads": 2}},
            mlp="swiglu", mlp_ratio=2.5, prefix_layers=[2], num_classes=3, dropout=0.1)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types
    assert d["mixer_options"]["gated"]["f_init"] == [0.8, 0.9]
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_json(c.to_json()) == c


def test_from_dict_unknown_and_missing_keys():
    d = cfg().to_dict()
    with pytest.raises(ValueError, match="unknown key.*'n_layer'.*valid keys.*n_layers"):
        ModelConfig.from_dict({**d, "n_layer": 3})
    d.pop("d_model")
    with pytest.raises(ValueError, match="missing.*'d_model'"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="expected a dict"):
        ModelConfig.from_dict([1])
    with pytest.raises(ValueError, match="invalid JSON"):
        ModelConfig.from_json("{")


def test_replace_revalidates():
    c = cfg(pattern="gated*2")
    assert c.replace(pattern="attn*3").n_layers == 3
    assert c.replace(norm="layernorm").norm == "layernorm"
    with pytest.raises(ValueError, match="norm"):
        c.replace(norm="bad")
    with pytest.raises(ValueError, match="unknown key.*'colour'"):
        c.replace(colour=1)


def test_mixer_option_values_checked_at_config_time():
    with pytest.raises(ValueError, match=r"mixer_options \(for 'mamba'\).*d_state"):
        cfg(pattern="mamba", mixer_options={"mamba": {"d_state": -1}})
    with pytest.raises(ValueError, match=r"mixer_options \(for 'attn'\).*n_heads"):
        cfg(pattern="attn", d_model=6, mixer_options={"attn": {"n_heads": 4}})
    with pytest.raises(ValueError, match=r"mixer_options \(for 'prefix-gated'\).*d_state"):
        cfg(pattern="prefix-gated", mixer_options={"gated": {"d_state": 1}})  # cannot be halved
    # S4D cannot be built on the meta device, but its argument checks run before its numeric init
    with pytest.raises(ValueError, match=r"mixer_options \(for 's4d'\).*d_state"):
        cfg(pattern="s4d", mixer_options={"s4d": {"d_state": 3}})
    cfg(pattern="s4d,s4,h3", mixer_options={"s4d": {"d_state": 4}})  # valid: no error despite meta limits

"""ssmkit -> GGUF -> ssmkit: exact in float32, within stated tolerances for f16 / q8_0 / q4_0."""

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.export import to_gguf
from ssmkit.interop import from_gguf

from .conftest import small_lm


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_is_bitwise(tmp_path, arch, tie):
    model = small_lm(f"{arch}*2", tie=tie, mixer_options={"mamba2": {"chunk_size": 8, "d_state": 16,
                                                                     "headdim": 16, "ngroups": 2}})
    back = from_gguf(to_gguf(model, tmp_path / "m.gguf"))
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 260, (2, 40))
    assert torch.equal(_logits(model, ids), _logits(back, ids))


# max |logit difference| bounds for this model (logits of size ~1): measured 1.6e-3/3.8e-3 (f16),
# 3.7e-2/7.2e-2 (q8_0), 0.72/0.96 (q4_0) for mamba/mamba2 on 2 x 50 random tokens
TOLERANCE = {"f16": 1e-2, "q8_0": 0.2, "q4_0": 2.0}


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_quantized_round_trip_loads_the_dequantized_weights(tmp_path, arch, quant):
    model = small_lm(f"{arch}*2", tie=False)
    path = to_gguf(model, tmp_path / "m.gguf", quant=quant)
    back = from_gguf(path)
    # oracle: every tensor equals gguf's dequantize of what the file holds, reshaped to ssmkit's layout
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    w = back.state_dict()
    ssm_in = torch.from_numpy(stored["blk.1.ssm_in.weight"].astype(np.float32))
    assert torch.equal(w["backbone.blocks.1.mixer.in_proj.weight"], ssm_in)
    assert torch.equal(w["lm_head.weight"], torch.from_numpy(stored["output.weight"].astype(np.float32)))
    for k, v in model.state_dict().items():  # float32 tensors come back exactly
        if "norm" in k or "conv1d" in k or k.endswith((".D", "A_log", "bias")):
            assert torch.equal(v, w[k]), k
    ids = torch.randint(0, 260, (2, 50))
    err = (_logits(model, ids) - _logits(back, ids)).abs().max().item()
    assert 0 < err < TOLERANCE[quant]


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_llama_cpp_only_keys_give_the_same_function(tmp_path, arch):
    """A file without ssmkit's keys (as llama.cpp's converter writes): config from llama.cpp's keys,
    A_log = log(-A) in float64."""
    model = small_lm(f"{arch}*2")
    path = to_gguf(model, tmp_path / "m.gguf", ssmkit_keys=False)
    assert not any(k.startswith("ssmkit.") for k in gguf.GGUFReader(path).fields)
    back = from_gguf(path)
    m, b = model.backbone.blocks[0].mixer, back.backbone.blocks[0].mixer
    assert back.config.norm_eps == model.config.norm_eps  # 1e-05 again, not float32's 9.9999997e-06
    assert (b.d_inner, b.d_state, b.d_conv) == (m.d_inner, m.d_state, m.d_conv)
    if arch == "mamba2":
        assert (b.nheads, b.headdim, b.ngroups) == (m.nheads, m.headdim, m.ngroups)
    a_log = back.backbone.blocks[1].mixer.A_log
    ref = model.backbone.blocks[1].mixer.A_log
    assert torch.allclose(a_log, ref, rtol=0, atol=2e-7)
    ids = torch.randint(0, 260, (2, 30))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=1e-5)


@settings(max_examples=8)
@given(arch=st.sampled_from(["mamba", "mamba2"]), d_model=st.sampled_from([8, 16, 24]), n_layers=st.integers(1, 3),
       d_state=st.sampled_from([1, 4, 16]), d_conv=st.integers(2, 5), tie=st.booleans(), vocab=st.integers(3, 70),
       dt_rank=st.integers(1, 5), headdim=st.sampled_from([4, 8]), ngroups=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_f32_round_trip_is_exact_for_any_shape(tmp_path_factory, arch, d_model, n_layers, d_state, d_conv, tie,
                                               vocab, dt_rank, headdim, ngroups, seed):
    opts = {"mamba": {"d_state": d_state, "d_conv": d_conv, "dt_rank": dt_rank},
            "mamba2": {"d_state": d_state, "d_conv": d_conv, "headdim": headdim, "ngroups": ngroups}}
    model = small_lm(arch, n_layers=n_layers, d_model=d_model, vocab=vocab, tie=tie, seed=seed,
                     mixer_options=opts)
    back = from_gguf(to_gguf(model, tmp_path_factory.mktemp("h") / "m.gguf"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, vocab, (2, 9))
    assert torch.equal(_logits(model, ids), _logits(back, ids))

"""A logit soft cap is refused by every format that has none (one-line errors), never silently dropped."""

import pytest

from ssmkit.export import to_gguf
from ssmkit.interop import to_transformers
from ssmkit.models import CausalLM, ModelConfig


def _capped(pattern: str) -> CausalLM:
    return CausalLM(ModelConfig(d_model=32, pattern=pattern, vocab_size=64, logits_soft_cap=30.0,
                                mixer_options={"mamba2": {"headdim": 16, "d_state": 16}}))


@pytest.mark.parametrize("pattern", ["mamba*2", "mamba2*2"])
def test_mamba_paths_refuse_a_soft_cap(tmp_path, pattern):
    with pytest.raises(ValueError, match="logits_soft_cap"):
        to_transformers(_capped(pattern))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        to_gguf(_capped(pattern), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_hybrid_family_without_a_cap_refuses_it():
    with pytest.raises(ValueError, match="logits_soft_cap=30.0: this family has no logit soft cap"):
        to_transformers(_capped("mamba2*2"), family="bamba")

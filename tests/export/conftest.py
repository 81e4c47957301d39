import pytest
import torch

from ssmkit.models import CausalLM, ModelConfig

pytest.importorskip("gguf")

MAMBA2_OPTS = {"d_state": 16, "headdim": 16, "ngroups": 2}


def small_lm(pattern: str, *, vocab: int = 260, tie: bool = True, seed: int = 0, **kw) -> CausalLM:
    """A small random CausalLM (float32, eval mode) with perturbed norms/D/biases so nothing is at its init."""
    torch.manual_seed(seed)
    opts = {"mamba2": dict(MAMBA2_OPTS), **kw.pop("mixer_options", {})}
    kw.setdefault("d_model", 64)
    model = CausalLM(ModelConfig(pattern=pattern, vocab_size=vocab, tie_embeddings=tie,
                                 mixer_options=opts, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D", "A_log", "dt_bias", "conv1d.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model

"""The fused decode paths and the options they cannot run: a block's own residual multiplier (not the config's)
and a later layer that needs gradients while layer 0 is frozen. Both must take the block path, whose result is
the reference; the stacks here reuse the float64 kernels the other fused-decode tests compile."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import CausalLM, ModelConfig
from tests.models.test_fused_decode_mamba3 import CONFIGS, blockwise_step

OPTIONS = {"mamba3": CONFIGS["siso"], "mamba": {}, "mamba2": {"headdim": 8, "d_state": 8}}


def _model(pattern: str, mixer: str, n_layers: int = 3) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=16, n_layers=n_layers, vocab_size=40, pattern=pattern,
                                 mixer_options={mixer: OPTIONS[mixer]})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "mamba3"])
def test_a_blocks_own_residual_multiplier_is_honoured(mixer):
    """Pure stacks: set after the plan was built, the multiplier must reach the step (the cached plan is dropped)."""
    model = _model(mixer, mixer)
    ids = torch.tensor([4, 9])
    with torch.no_grad():
        model.step(ids, model.init_state(2))  # builds and caches the fused plan
        model.backbone.blocks[1].residual_multiplier = 0.5
        got, _ = model.step(ids, model.init_state(2))
        want, _ = blockwise_step(model, ids, model.init_state(2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_a_blocks_own_residual_multiplier_in_a_hybrid_run(mixer):
    """Hybrids step runs of Mamba / Mamba-2 blocks in one launch (run_plans): a multiplier inside a run counts."""
    model = _model(f"{mixer},{mixer},attn", mixer)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(9))
    model.backbone.blocks[0].residual_multiplier = 0.3
    with torch.no_grad():
        full = model(x).logits[:, -1]
        state = model(x[:, :-1], return_final_state=True).state
        got, _ = model.step(x[:, -1], state)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "mamba3"])
def test_a_later_trainable_layer_keeps_its_gradient(mixer):
    """Layer 0 and the embedding frozen, the last block trainable: step must keep the graph to it."""
    model = _model(mixer, mixer)
    for p in [*model.backbone.embedding.parameters(), *model.backbone.blocks[0].parameters()]:
        p.requires_grad_(False)
    logits, _ = model.step(torch.tensor([3]), model.init_state(1))
    assert logits.requires_grad
    logits.sum().backward()
    assert all(p.grad is not None for p in model.backbone.blocks[-1].parameters() if p.requires_grad)

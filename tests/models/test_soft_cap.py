"""``ModelConfig.logits_soft_cap``: CausalLM's logits are cap * tanh(logits / cap) in forward, step, the head
itself (which generation calls directly), after int8 quantization and through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from ssmkit.infer import generate, quantize_weights
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.heads import SoftCappedHead
from tests.layers.contract import assert_close

CAP = 0.5


def _pair(tie: bool, pattern: str = "gated,attn") -> tuple[CausalLM, CausalLM]:
    """(capped model, the same weights uncapped), float64."""
    cfg = ModelConfig(d_model=8, vocab_size=16, pattern=pattern, tie_embeddings=tie, logits_soft_cap=CAP)
    torch.manual_seed(0)
    capped = CausalLM(cfg).double().eval()
    plain = CausalLM(cfg.replace(logits_soft_cap=None)).double().eval()
    plain.load_state_dict(capped.state_dict())
    return capped, plain


@pytest.mark.parametrize("tie, pattern", [(True, "gated,attn"), (False, "gated,attn"), (True, "mamba*2")])
def test_forward_step_and_head_are_capped(tie, pattern):
    capped, plain = _pair(tie, pattern)  # mamba*2 steps through the fused decode kernel, the cap after it
    assert isinstance(capped.lm_head, SoftCappedHead) and not isinstance(capped.lm_head, torch.nn.Linear)
    assert (capped.lm_head.weight is capped.backbone.embedding.weight) == tie
    x = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, raw = capped(x).logits, plain(x).logits
        assert torch.equal(logits, torch.tanh(raw / CAP) * CAP)
        assert raw.abs().max() > 2 * CAP  # the cap changes these logits
        hidden, _ = capped.backbone(x)
        assert torch.equal(capped.lm_head(hidden), logits)
        state, steps = capped.init_state(2), []
        for t in range(x.shape[1]):
            lg, state = capped.step(x[:, t], state)
            steps.append(lg)
    assert_close(torch.stack(steps, 1), logits, 1e-10, "capped steps vs forward")


def test_invalid_cap_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"^ModelConfig: logits_soft_cap must be a number in \(0.0, 1000000.0\], "
                                         r"got -1.0$"):
        ModelConfig(d_model=8, vocab_size=16, logits_soft_cap=-1.0)


def test_quantized_and_saved_models_keep_the_cap(tmp_path):
    capped, _ = _pair(False)
    capped = capped.float()
    x = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(2))
    q = quantize_weights(capped)
    assert isinstance(q.lm_head, SoftCappedHead)
    with torch.no_grad():
        assert q(x).logits.abs().max() <= CAP
    capped.save_pretrained(tmp_path / "m")
    back = CausalLM.from_pretrained(tmp_path / "m")
    assert back.config.logits_soft_cap == CAP
    with torch.no_grad():
        assert torch.equal(back.eval()(x).logits, capped(x).logits)
    assert torch.equal(generate(back, x, 4, temperature=1.0, seed=3), generate(capped, x, 4, temperature=1.0, seed=3))

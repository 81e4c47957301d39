"""quantize_weights: every family runs int8, logits stay close, decoding equals the quantized forward, the
original model is untouched."""

from __future__ import annotations

import pytest
import torch

from ssmkit.infer import Int8Linear, generate, quantize_weights
from ssmkit.models import CausalLM, ModelConfig, PrefixLM


@pytest.mark.parametrize("pattern", ["mamba", "mamba2", "gated", "rglru", "attn", "h3", "s4d", "mamba2*1,attn"])
def test_quantized_model_matches_float_and_its_own_steps(pattern):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, n_layers=2, pattern=pattern, vocab_size=50, mlp="swiglu")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_weights(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the original is unchanged"
    assert isinstance(q.lm_head, Int8Linear) and not any(p.requires_grad for p in q.parameters())
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.rpartition(".")[2] == "dt_proj" for n, m in q.named_modules() if isinstance(m, torch.nn.Linear))
    assert len(linears) <= 2
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
        assert float((out - ref).abs().max() / ref.abs().max()) < 0.05
        # the quantized model's recurrent steps equal its own parallel forward
        _, state = q.backbone(ids[:, :4], return_final_state=True, input_name="input_ids")
        for t in range(4, 10):
            logits, state = q.step(ids[:, t], state)
            torch.testing.assert_close(logits, out[:, t], rtol=1e-4, atol=1e-4)
    assert generate(q, ids, 5, temperature=0).shape == (2, 5)


def test_prefix_lm_and_errors():
    torch.manual_seed(0)
    model = PrefixLM(ModelConfig(d_model=32, n_layers=2, pattern="gated", vocab_size=50)).eval()
    q = quantize_weights(model)
    ids = torch.randint(0, 50, (1, 8))
    pm = torch.arange(8)[None] < 5
    with torch.no_grad():
        torch.testing.assert_close(q(ids, prefix_mask=pm).logits, model(ids, prefix_mask=pm).logits,
                                   rtol=0.05, atol=0.05)
    with pytest.raises(TypeError, match="SequenceModel"):
        quantize_weights(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="float32"):
        quantize_weights(model.double())

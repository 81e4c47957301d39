"""Hybrids with attention decode after weight quantization (the KV cache no longer reads qkv.weight)."""

import pytest
import torch

from ssmkit.infer import generate, quantize_weights
from ssmkit.models import CausalLM, ModelConfig


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_hybrid_with_attention_steps_like_its_forward(bits):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, pattern="mamba,attn", vocab_size=64,
                                 mixer_options={"attn": {"n_heads": 2}})).eval()
    q = quantize_weights(model, bits=bits, group_size=32) if bits == 4 else quantize_weights(model)
    prompt = torch.randint(0, 64, (2, 5))
    new = generate(q, prompt, 6)
    assert new.shape == (2, 6)
    with torch.no_grad():
        full = q(torch.cat([prompt, new], 1)).logits  # the quantized model's own forward over the sequence
    assert torch.equal(new, full[:, 4:-1].argmax(-1))
    state = q.init_state(2)  # stepping from an empty cache, token by token, matches the forward too
    with torch.no_grad():
        for t in range(5):
            logits, state = q.step(prompt[:, t], state)
    assert (logits - full[:, 4]).abs().max().item() < 1e-4

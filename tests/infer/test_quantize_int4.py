"""quantize_weights(bits=4): every family runs int4, logits stay close to float32, a model's steps equal its own
forward, the fused Mamba decode equals the block-by-block step, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from ssmkit.infer import generate, quantize_weights
from ssmkit.infer.quantize import Int4Linear
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import stack_plan
from ssmkit.ops import fused_kernels
from ssmkit.ops.int4_linear import dequantize_int4


@pytest.mark.parametrize("pattern", ["mamba", "mamba2", "gated", "mamba2*1,attn"])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_model_matches_float_and_its_own_steps(pattern, group):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=64, n_layers=2, pattern=pattern, vocab_size=50)).eval()
    q = quantize_weights(model, bits=4, group_size=group)
    assert isinstance(q.lm_head, Int4Linear) and q.lm_head.group_size == group
    # the oracle: the float model with every quantized layer a new nn.Linear holding the dequantized weight
    # (new layers: a tied LM head must not change the embedding)
    oracle = copy.deepcopy(model)
    for name, m in q.named_modules():
        if isinstance(m, Int4Linear):
            new = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight.data, new.bias = dequantize_int4(m.qweight, m.scale), None
            if m.bias is not None:
                new.bias = torch.nn.Parameter(m.bias.clone())
            parent, _, attr = name.rpartition(".")
            setattr(oracle.get_submodule(parent) if parent else oracle, attr, new)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
        torch.testing.assert_close(out, oracle(ids).logits, rtol=1e-5, atol=1e-5)
        assert float((out - ref).abs().max() / ref.abs().max()) < 0.3
        _, state = q.backbone(ids[:, :4], return_final_state=True, input_name="input_ids")
        for t in range(4, 10):
            logits, state = q.step(ids[:, t], state)
            torch.testing.assert_close(logits, out[:, t], rtol=1e-4, atol=1e-4)
    assert generate(q, ids, 3, temperature=0).shape == (2, 3)


def test_int4_mamba_decodes_in_one_launch_like_block_by_block():
    torch.manual_seed(1)
    q = quantize_weights(CausalLM(ModelConfig(d_model=64, n_layers=2, vocab_size=40)).eval(), bits=4)
    plan = stack_plan(q.backbone, q.lm_head)
    assert plan is not None and plan.fusable
    ids = torch.tensor([[1, 5, 7, 2], [3, 3, 0, 9]])
    with torch.no_grad():
        s1, s2 = q.init_state(2), q.init_state(2)
        for t in range(4):
            fused, s1 = q.step(ids[:, t], s1)
            with fused_kernels(False):
                plain, s2 = q.step(ids[:, t], s2)
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_errors():
    model = CausalLM(ModelConfig(d_model=48, n_layers=1, vocab_size=30))
    with pytest.raises(ValueError, match="multiple of group_size 32; not: .*in_proj \\(48\\)"):
        quantize_weights(model, bits=4)
    assert isinstance(quantize_weights(model, bits=4, group_size=16).lm_head, Int4Linear)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_weights(model, bits=2)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_weights(model, bits=4, group_size=24)

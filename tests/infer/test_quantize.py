"""quantize_weights: every family runs int8, logits stay close, decoding equals the quantized forward, the
original model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from ssmkit.infer import Int8Linear, generate, quantize_weights
from ssmkit.infer.quantize import RowSplitLinear
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


@pytest.mark.parametrize("bits", [8, 4])
def test_delta_rows_of_a_mamba_with_dt_from_in_proj_stay_float(bits):
    """dt_source='in_proj': in_proj's last d_inner rows (Δ) stay float32, as the default block's dt_proj does;
    the model equals the float one whose other linear weights are the dequantized ones (float32: the int8
    product rounds in its own order), and its steps equal its forward."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, n_layers=2, vocab_size=50,
                                 mixer_options={"mamba": {"dt_source": "in_proj", "out_norm": True}})).eval()
    q = quantize_weights(model, bits=bits)
    ref = copy.deepcopy(model)
    for blk, rblk in zip(q.backbone.blocks, ref.backbone.blocks, strict=True):
        ip, di = blk.mixer.in_proj, blk.mixer.d_inner
        assert isinstance(ip, RowSplitLinear) and (ip.in_features, ip.out_features) == (32, 3 * di)
        assert torch.equal(ip.kept.weight, rblk.mixer.in_proj.weight[2 * di:].float())
        with torch.no_grad():
            rblk.mixer.in_proj.weight[:2 * di] = ip.quantized.dequantized_weight()
            for name in ("x_proj", "out_proj"):
                getattr(rblk.mixer, name).weight.copy_(getattr(blk.mixer, name).dequantized_weight())
    with torch.no_grad():
        ref.lm_head.weight = torch.nn.Parameter(q.lm_head.dequantized_weight())  # unties the embedding
        ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
        out = q(ids).logits
        torch.testing.assert_close(out, ref(ids).logits, rtol=1e-5, atol=1e-5)
        state = q.init_state(2)
        for t in range(6):
            logits, state = q.step(ids[:, t], state)
            torch.testing.assert_close(logits, out[:, t], rtol=1e-4, atol=1e-4)
    quantized = quantize_weights(model, bits=bits, dt_rows="quantized").backbone.blocks[0].mixer.in_proj
    assert not isinstance(quantized, RowSplitLinear) and quantized.out_features == 3 * model.backbone.blocks[
        0].mixer.d_inner
    with pytest.raises(ValueError, match="dt_rows must be one of"):
        quantize_weights(model, dt_rows="int8")
    with pytest.raises(ValueError, match="n_kept must be in"):
        RowSplitLinear.from_linear(torch.nn.Linear(4, 3), 3, Int8Linear.from_linear)

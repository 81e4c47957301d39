"""Integer activations (q8 blocks of 32) in the quantized decode products: the torch quantizer, decode_linear and
the fused Mamba / Mamba-2 stack steps against the plain oracles (ssmkit.ops.reference.q8_activations, q8_linear,
mamba_stack_step / reference_mamba2.mamba2_stack_step with act_quant) in float64, and the quantized models' steps
against their own prefill."""

from __future__ import annotations

import numba as nb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer import quantize_weights
from ssmkit.infer.quantize import Int4Linear
from ssmkit.models import CausalLM, ModelConfig
from ssmkit.models.fused_decode import mamba2_step_weights, stack_plan
from ssmkit.models.outputs import ModelState
from ssmkit.ops import fused_kernels, quantize_int8, reference
from ssmkit.ops import reference_mamba2 as reference2
from ssmkit.ops import threads as threads_mod
from ssmkit.ops.decode_linear import decode_linear
from ssmkit.ops.int4_linear import quantize_int4
from ssmkit.ops.q8_act import q8_dequant, q8_quantize


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 100), zero_block=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_activation_quantizer_equals_the_oracle(rows, k, zero_block, dtype, seed):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    if zero_block:
        x[:, :32] = 0
    q, d = q8_quantize(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and d.shape == (rows, (k + 31) // 32)
    assert torch.equal(q8_dequant(x), reference.q8_activations(x))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 90), out=st.integers(1, 13), bias=st.booleans(),
       seed=st.integers(0, 99))
def test_int8_rows_with_int8_activations_equal_the_oracle(rows, k, out, bias, seed):
    """Any in_features: a last block shorter than 32 is summed with its own scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    q, s = quantize_int8(torch.randn(out, k, generator=g))
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    want = reference.q8_linear(x, q, s.double(), b)
    with fused_kernels(True):
        got = decode_linear(x, q, b, scale=s.double(), act_quant=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with fused_kernels(False):  # the torch ops (prefill, gradients) give the same numbers
        torch.testing.assert_close(decode_linear(x, q, b, scale=s.double(), act_quant=True), want, rtol=1e-12,
                                   atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 4), group=st.sampled_from([16, 32, 64, 128]),
       out=st.integers(1, 9), seed=st.integers(0, 99))
def test_int4_rows_with_int8_activations_equal_the_oracle(rows, groups, group, out, seed):
    """Groups 32-128 take the integer products; group 16 the float rows on the dequantized activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * group, generator=g, dtype=torch.float64)
    p, s = quantize_int4(torch.randn(out, groups * group, generator=g), group)
    want = reference.q8_linear(x, p, s)
    with fused_kernels(True):
        torch.testing.assert_close(decode_linear(x, p, None, scale=s.double(), act_quant=True), want, rtol=1e-12,
                                   atol=1e-12)


def _model(pattern: str, d_model: int, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    opts = {"mamba2": {"d_state": 8, "headdim": 8, "ngroups": 1, "chunk_size": 4}}
    model = CausalLM(ModelConfig(d_model=d_model, n_layers=2, vocab_size=50, pattern=pattern,
                                 mixer_options=opts)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _mixed(pattern: str, d_model: int) -> CausalLM:
    """int8 in/x projections, int4 out projections and LM head, all with int8 activations: both quantized row
    products in one kernel compile."""
    base = _model(pattern, d_model)
    q = quantize_weights(base, bits=8, activations="int8")
    for blk, orig in zip(q.backbone.blocks, base.backbone.blocks, strict=True):
        blk.mixer.out_proj = Int4Linear.from_linear(orig.mixer.out_proj, act_quant=True)
    q.lm_head = Int4Linear.from_linear(base.lm_head, act_quant=True)
    return q


def _oracle(model, ids, state):
    bb = model.backbone
    plan = stack_plan(bb, model.lm_head)
    norms = [b.norm.weight.double() for b in bb.blocks]
    args = (bb.embed(ids).double(), plan.layers, norms, bb.final_norm.eps, bb.final_norm.weight.double(),
            bb.final_norm.eps, [s.conv.double() for s in state.layers], [s.ssm.double() for s in state.layers])
    if plan.__class__.__name__ == "MambaStackPlan":
        return reference.mamba_stack_step(*args, head=plan.head, act_quant=True)
    layers = [mamba2_step_weights(b.mixer) for b in bb.blocks]
    return reference2.mamba2_stack_step(args[0], layers, *args[2:], head=plan.head, act_quant=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern,d_model", [("mamba", 64), ("mamba2", 64)])
def test_fused_stack_with_int8_activations_equals_the_oracle_and_the_torch_path(pattern, d_model, threads,
                                                                                monkeypatch):
    """threads=2: the one launch runs on 2 numba threads however small the model, so the stages' chunks of
    quantized rows are shared between them."""
    if threads > 1:
        assert nb.config.NUMBA_NUM_THREADS >= threads
        monkeypatch.setattr(threads_mod, "threads_for", lambda work: threads)
    q = _mixed(pattern, d_model).double()  # scales and norms in float64: exact up to float rounding
    assert stack_plan(q.backbone, q.lm_head).act_quant
    state, slow, orc = q.init_state(2), q.init_state(2), q.init_state(2)
    with torch.no_grad():
        for t in range(3):
            ids = torch.tensor([t, 7 + t])
            logits, state = q.step(ids, state)
            with fused_kernels(False):
                want, slow = q.step(ids, slow)
            torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
            _, convs, ssms, olog = _oracle(q, ids, orc)
            orc = ModelState([type(s)(conv=c, ssm=m) for s, c, m in zip(orc.layers, convs, ssms, strict=True)])
            torch.testing.assert_close(logits, olog, rtol=1e-10, atol=1e-10)
            for a, m in zip(state.layers, ssms, strict=True):
                torch.testing.assert_close(a.ssm, m.reshape(a.ssm.shape), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", ["mamba", "mamba2"])
def test_quantized_model_steps_continue_its_prefill(pattern):
    """float32 decode steps (fused, integer products) equal the same model's prefill (torch ops on the
    dequantized activations) and differ from the float-activation model by the activation rounding only."""
    base = _model(pattern, 64, seed=1)
    q = quantize_weights(base, bits=8, activations="int8")
    qf = quantize_weights(base, bits=8)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, ref = q(ids).logits, qf(ids).logits
        assert 0 < float((full - ref).abs().max() / ref.abs().max()) < 0.05
        _, state = q.backbone(ids[:, :4], return_final_state=True, input_name="input_ids")
        for t in range(4, 8):
            logits, state = q.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_bad_settings_get_one_line_errors():
    base = _model("mamba", 32)
    with pytest.raises(ValueError, match="activations must be one of"):
        quantize_weights(base, activations="int4")
    q = quantize_weights(base, activations="int8")
    q.lm_head.act_quant = False
    with pytest.raises(ValueError, match="disagree on act_quant"):
        q.step(torch.tensor([1]), q.init_state(1))
    with pytest.raises(ValueError, match="act_quant must be a bool"):
        decode_linear(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8), scale=torch.ones(2), act_quant=1)

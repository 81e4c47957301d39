"""W8A8: the Hadamard rotation is exact in float64, the integer product equals its float64 fake-quant oracle,
calibration scales (max and percentile clipping), whole models stay close to float32, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.infer.w8a8 import (
    W8A8Linear,
    calibrate,
    hadamard_block,
    hadamard_matrix,
    hadamard_rotate,
    int8_matmul,
    quantize_w8a8,
)
from ssmkit.models import CausalLM, ModelConfig


@pytest.mark.parametrize("n", [48, 1536])
def test_rotation_is_exact_in_float64(n):
    g = torch.Generator().manual_seed(n)
    block = hadamard_block(n)
    assert block == {48: 16, 1536: 512}[n]
    h = hadamard_matrix(block, torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-14)
    x, w = torch.randn(3, 5, n, generator=g, dtype=torch.float64), torch.randn(7, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.linear(hadamard_rotate(x, block), hadamard_rotate(w, block)), F.linear(x, w),
                               rtol=1e-12, atol=1e-12)
    # the rotation mixes within blocks only
    x2 = x.clone()
    x2[..., :block] += 1
    assert torch.equal(hadamard_rotate(x2, block)[..., block:], hadamard_rotate(x, block)[..., block:])


@given(m=st.integers(0, 40), k=st.integers(1, 70), n=st.integers(1, 50))
def test_int8_matmul_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * 10_000 + k * 100 + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, (a.long() @ b.long()).int())


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_equals_its_fake_quant_oracle(rotate, bias):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 40, bias=bias)
    x = torch.randn(2, 9, 64, generator=g) * 2
    x_scale = 3.0 / 127  # clips values beyond 3 (after the rotation)
    q = W8A8Linear.from_linear(lin, x_scale, rotate)
    assert q.block == (64 if rotate else 0)
    xr = hadamard_rotate(x.double(), 64) if rotate else x.double()
    xq = torch.round(xr / x_scale).clamp(-127, 127) * x_scale
    wq = q.qweight_t.t().double() * q.w_scale.double()[:, None]
    want = F.linear(xq, wq, None if lin.bias is None else lin.bias.double())
    torch.testing.assert_close(q(x).double(), want, rtol=1e-6, atol=1e-5)
    # and it is close to the float layer when nothing is clipped
    q2 = W8A8Linear.from_linear(lin, float(xr.abs().max()) / 127, rotate)
    with torch.no_grad():
        ref = lin(x)
    assert float((q2(x) - ref).abs().max() / ref.abs().max()) < 0.05


def _batches(vocab, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def test_calibration_takes_max_and_percentile():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, n_layers=1, pattern="mamba", vocab_size=30)).eval()
    seen = {}
    mixer = model.backbone.blocks[0].mixer
    handles = [mixer.x_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("u", []).append(a[0])),
               mixer.in_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("xin", []).append(a[0]))]
    batches = _batches(30)
    clip = calibrate(model, batches, percentile=90.0)
    for h in handles:
        h.remove()
    name = "backbone.blocks.0.mixer."
    assert clip[name + "in_proj"] == max(float(t.abs().max()) for t in seen["xin"])
    per_batch = [float(t.abs().flatten().quantile(0.9, interpolation="higher")) for t in seen["u"]]
    assert clip[name + "x_proj"] == pytest.approx(sum(per_batch) / 2, rel=1e-6)
    assert clip[name + "x_proj"] < max(float(t.abs().max()) for t in seen["u"])
    assert "backbone.blocks.0.mixer.dt_proj" not in clip


@pytest.mark.parametrize("pattern", ["mamba", "mamba2", "gated"])
def test_w8a8_model_close_to_float(pattern):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=32, n_layers=2, pattern=pattern, vocab_size=50)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_w8a8(model, _batches(50, seed=1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the original is unchanged"
    out_proj = q.backbone.blocks[0].mixer.out_proj
    assert isinstance(q.lm_head, W8A8Linear) and out_proj.block == hadamard_block(out_proj.in_features) > 1
    ids = _batches(50, 1, seed=2)[0]
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1


def test_errors():
    model = CausalLM(ModelConfig(d_model=32, n_layers=1, vocab_size=30))
    with pytest.raises(ValueError, match="percentile must be in"):
        calibrate(model, _batches(30), percentile=0)
    with pytest.raises(ValueError, match="batches is empty"):
        quantize_w8a8(model, [])
    with pytest.raises(TypeError, match="SequenceModel"):
        quantize_w8a8(torch.nn.Linear(2, 2), _batches(30))
    q = W8A8Linear.from_linear(torch.nn.Linear(8, 4), 0.1, False)
    with pytest.raises(ValueError, match=r"x must be float32 \(\.\.\., 8\) like its scales"):
        q(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_scale must be a positive"):
        W8A8Linear.from_linear(torch.nn.Linear(8, 4), 0.0, False)

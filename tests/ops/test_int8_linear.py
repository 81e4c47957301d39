"""int8 weight-only linear: quantization bounds, the fused kernel against the float64 oracle, fallbacks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import dequantize_int8, fused_kernels, int8_linear, quantize_int8, reference
from ssmkit.ops.int8_linear import GEMV_MAX_ROWS


def test_quantize_bounds_and_zero_rows():
    w = torch.randn(70, 33)
    w[3] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all()), "rounding error at most half a step"
    assert s[3] == 1 and bool((q[3] == 0).all())
    assert torch.equal(q.abs().amax(1)[torch.arange(70) != 3], torch.full((69,), 127, dtype=torch.int8))


@given(rows=st.integers(1, GEMV_MAX_ROWS + 3), d_in=st.integers(1, 70), d_out=st.integers(1, 150),
       bias=st.booleans(), lead=st.sampled_from([(), (1,), (2,)]))
def test_kernel_matches_oracle(rows, d_in, d_out, bias, lead):
    g = torch.Generator().manual_seed(rows * 1000 + d_in * 7 + d_out)
    q, s = quantize_int8(torch.randn(d_out, d_in, generator=g))
    b = torch.randn(d_out, generator=g) if bias else None
    shape = (*lead, rows, d_in) if lead else (rows, d_in)
    x = torch.randn(*shape, generator=g)
    y = int8_linear(x, q, s, b)
    want = reference.int8_linear(x.double(), q, s, b)
    assert y.shape == (*shape[:-1], d_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6)
    with fused_kernels(False):
        torch.testing.assert_close(int8_linear(x, q, s, b).double(), want, rtol=1e-5, atol=1e-4)


def test_gradients_flow_to_x_through_the_fallback():
    q, s = quantize_int8(torch.randn(5, 4))
    x = torch.randn(2, 4, requires_grad=True)
    int8_linear(x, q, s).sum().backward()
    torch.testing.assert_close(x.grad, dequantize_int8(q, s).sum(0).expand(2, 4))


def test_close_to_float_weights():
    w, x = torch.randn(300, 128), torch.randn(3, 128)
    q, s = quantize_int8(w)
    ref = F.linear(x, w)
    assert float((int8_linear(x, q, s) - ref).abs().max() / ref.abs().max()) < 0.02


def test_bad_inputs():
    q, s = quantize_int8(torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must be float32"):
        int8_linear(torch.randn(2, 3), q, s)
    with pytest.raises(ValueError, match="x must be float32"):
        int8_linear(torch.randn(2, 4, dtype=torch.float64), q, s)
    with pytest.raises(ValueError, match="q must be an int8"):
        int8_linear(torch.randn(2, 4), q.float(), s)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(5,\)"):
        int8_linear(torch.randn(2, 4), q, s[:4])
    with pytest.raises(ValueError, match="bias must be None or float32"):
        int8_linear(torch.randn(2, 4), q, s, torch.randn(4))
    with pytest.raises(ValueError, match="weight must be a float tensor"):
        quantize_int8(torch.randn(3))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([[float("nan")]]))

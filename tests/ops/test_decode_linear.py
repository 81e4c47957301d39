"""decode_linear: the row-chunked kernel against F.linear (float32/float64, int8 weights), fallbacks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import fused_kernels, quantize_int8, reference
from ssmkit.ops.decode_linear import DECODE_MAX_ROWS, decode_linear


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, DECODE_MAX_ROWS + 3), d_in=st.integers(1, 90), d_out=st.integers(1, 200),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       lead=st.sampled_from([(), (2,)]))
def test_matches_f_linear(rows, d_in, d_out, bias, dtype, lead):
    g = torch.Generator().manual_seed(rows * 7919 + d_in * 31 + d_out)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(*lead, rows, d_in, generator=g, dtype=torch.float64)
    want = F.linear(x, w, b)
    got = decode_linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * (1 + float(want.abs().max()))
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_int8_matches_oracle_with_and_without_the_kernel(rows):
    q, s = quantize_int8(torch.randn(77, 40))
    x, b = torch.randn(rows, 40), torch.randn(77)
    want = reference.int8_linear(x.double(), q, s, b)
    torch.testing.assert_close(decode_linear(x, q, b, scale=s).double(), want, rtol=1e-5, atol=1e-5)
    with fused_kernels(False):
        torch.testing.assert_close(decode_linear(x, q, b, scale=s).double(), want, rtol=1e-5, atol=1e-5)


def test_gradients_and_large_inputs_use_f_linear():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 4)
    decode_linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(6, 4))
    big = torch.randn(DECODE_MAX_ROWS + 1, 4)
    torch.testing.assert_close(decode_linear(big, w.detach()), F.linear(big, w.detach()))


def test_bad_inputs():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"x must be a float tensor \(\.\.\., 4\)"):
        decode_linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        decode_linear(torch.randn(2, 4, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="weight must be int8"):
        decode_linear(torch.randn(2, 4), w, scale=torch.ones(6))
    with pytest.raises(ValueError, match="scale must be"):
        decode_linear(torch.randn(2, 4), quantize_int8(w)[0], scale=torch.ones(5))
    with pytest.raises(ValueError, match="bias must be"):
        decode_linear(torch.randn(2, 4), w, torch.ones(5))


@pytest.mark.parametrize("bias", [False, True])
def test_zero_input_features_give_the_bias(bias):
    w, b = torch.randn(5, 0), (torch.randn(5) if bias else None)
    x = torch.randn(3, 0)
    want = b.expand(3, 5) if bias else torch.zeros(3, 5)
    torch.testing.assert_close(decode_linear(x, w, b), want)
    q, s = quantize_int8(torch.randn(5, 0))
    torch.testing.assert_close(decode_linear(x, q, b, scale=s), want)

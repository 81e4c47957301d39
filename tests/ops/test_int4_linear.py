"""int4 weight-only linear: the packing against a loop unpacker, the exact oracle relation in float64, the fused
GEMV (alone and inside the fused Mamba stack) against dequantize-then-matmul, fallbacks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import fused_kernels, reference
from ssmkit.ops.decode_linear import decode_linear, dequantized
from ssmkit.ops.int4_linear import GEMV_MAX_ROWS, dequantize_int4, int4_linear, quantize_int4
from ssmkit.ops.mamba_step import MambaStackPlan, MambaStepWeights, mamba_stack_step, mamba_step


def loop_unpack(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The documented layout read one byte at a time, in float64."""
    out_f, n_bytes = packed.shape
    group = 2 * n_bytes // scale.shape[1]
    half = group // 2
    w = torch.zeros(out_f, 2 * n_bytes, dtype=torch.float64)
    for o in range(out_f):
        for k in range(n_bytes):
            byte = int(packed[o, k]) & 0xFF
            g, j = divmod(k, half)
            w[o, g * group + j] = ((byte & 15) - 8) * float(scale[o, g])
            w[o, g * group + half + j] = ((byte >> 4) - 8) * float(scale[o, g])
    return w


@pytest.mark.parametrize("group", [32, 64])
def test_packing_bounds_and_zero_groups(group):
    w = torch.randn(7, 2 * group, generator=torch.Generator().manual_seed(group))
    w[2, :group] = 0
    packed, scale = quantize_int4(w, group)
    assert packed.shape == (7, group) and packed.dtype == torch.int8 and scale.shape == (7, 2)
    deq = dequantize_int4(packed, scale)
    exact = loop_unpack(packed, scale)
    assert torch.equal(dequantized(packed, scale, torch.float64), exact), "float64: q * scale exactly"
    assert torch.equal(deq, exact.float()), "float32: q * scale rounded once"
    err = (deq - w).abs().reshape(7, 2, group)
    assert bool((err <= scale[..., None] / 2 + 1e-7).all()), "rounding error at most half a step"
    assert scale[2, 0] == 1 and bool((deq[2, :group] == 0).all())
    q = torch.round(deq.reshape(7, 2, group) / scale[..., None])
    assert bool((q.abs().amax(-1)[scale != 1] == 7).all()), "each group's largest weight maps to +-7"


@given(rows=st.integers(1, GEMV_MAX_ROWS + 3), groups=st.integers(1, 3), group=st.sampled_from([32, 64]),
       d_out=st.integers(1, 40), bias=st.booleans(), lead=st.sampled_from([(), (2,)]))
def test_kernel_matches_dequantize_then_matmul(rows, groups, group, d_out, bias, lead):
    g = torch.Generator().manual_seed(rows * 1000 + groups * 7 + d_out)
    packed, scale = quantize_int4(torch.randn(d_out, groups * group, generator=g), group)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(*lead, rows, groups * group, generator=g)
    want = F.linear(x.double(), loop_unpack(packed, scale), None if b is None else b.double())
    y = int4_linear(x, packed, scale, b)
    assert y.shape == (*lead, rows, d_out) and y.dtype == torch.float32
    atol = 1e-5 * float(want.abs().max()) + 1e-5
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=atol)
    with fused_kernels(False):
        torch.testing.assert_close(int4_linear(x, packed, scale, b).double(), want, rtol=1e-5, atol=atol)
    # float64 inputs through decode_linear: the kernel is exact up to float64 summation order
    y64 = decode_linear(x.double(), packed, None if b is None else b.double(), scale=scale.double())
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_close_to_float_weights_and_gradients_through_the_fallback():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 128, generator=g), torch.randn(3, 128, generator=g)
    packed, scale = quantize_int4(w, 32)
    ref = F.linear(x, w)
    assert float((int4_linear(x, packed, scale) - ref).abs().max() / ref.abs().max()) < 0.15
    xg = x.clone().requires_grad_(True)
    int4_linear(xg, packed, scale).sum().backward()
    # float32 sums of 300 terms in another order: allow a few ulps of the sum's magnitude
    torch.testing.assert_close(xg.grad, dequantize_int4(packed, scale).sum(0).expand(3, 128), rtol=1e-5, atol=1e-4)


def _int4_weights(d_model=64, di=64, n=4, rank=2, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    w = dict(in_w=r(2 * di, d_model, s=d_model ** -0.5), in_b=r(2 * di), conv_w=r(di, width, s=0.5), conv_b=r(di),
             x_w=r(rank + 2 * n, di, s=di ** -0.5), dt_w=r(di, rank, s=rank ** -0.5), dt_b=r(di) - 2,
             a_log=r(di, n, s=0.5), d=r(di), out_w=r(d_model, di, s=di ** -0.5), out_b=None)
    deq = dict(w)
    for name in ("in", "x", "out"):
        q, s = quantize_int4(w[f"{name}_w"], 32)
        w[f"{name}_w"], w[f"{name}_scale"] = q, s
        deq[f"{name}_w"] = loop_unpack(q, s).float()
    return MambaStepWeights(**w), MambaStepWeights(**deq)


@pytest.mark.parametrize("batch", [1, 5])
def test_fused_mamba_stack_with_int4_weights_and_head(batch):
    layers, deq_layers = zip(*(_int4_weights(seed=i) for i in range(2)), strict=True)
    g = torch.Generator().manual_seed(7)
    norms = [1 + 0.1 * torch.randn(64, generator=g) for _ in layers]
    final = 1 + 0.1 * torch.randn(64, generator=g)
    hq, hs = quantize_int4(torch.randn(101, 64, generator=g), 64)
    plan = MambaStackPlan(list(layers), norms, final, head=(hq, hs, None))
    assert plan.fusable
    convs = [torch.randn(batch, 64, 3, generator=g) for _ in layers]
    ssms = [torch.randn(batch, 64, 4, generator=g) for _ in layers]
    h = torch.randn(batch, 64, generator=g)
    want = reference.mamba_stack_step(h.double(), list(deq_layers), norms, 1e-5, final, 1e-5,
                                      [c.double() for c in convs], [s.double() for s in ssms],
                                      (loop_unpack(hq, hs), None, None))
    for kernels in (True, False):
        with fused_kernels(kernels):
            got = mamba_stack_step(h, plan, convs, ssms)
        for a, b in zip([got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]], strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    # the one-mixer step takes the same weights
    y, _, _ = mamba_step(h, layers[0], convs[0], ssms[0])
    y_ref, _, _ = reference.mamba_step(h.double(), deq_layers[0], convs[0].double(), ssms[0].double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="multiple of group_size 32"):
        quantize_int4(torch.randn(4, 40), 32)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int4(torch.full((2, 32), float("nan")), 32)
    packed, scale = quantize_int4(torch.randn(5, 64), 32)
    with pytest.raises(ValueError, match=r"x must be float32 \(\.\.\., 64\)"):
        int4_linear(torch.randn(2, 32), packed, scale)
    with pytest.raises(ValueError, match="scale must be float32"):
        int4_linear(torch.randn(2, 64), packed, scale[:, :1].contiguous().expand(5, 3))
    with pytest.raises(ValueError, match="packed must be an int8"):
        int4_linear(torch.randn(2, 64), packed.view(torch.uint8), scale)
    with pytest.raises(ValueError, match="bias must be None or float32"):
        int4_linear(torch.randn(2, 64), packed, scale, torch.randn(4))
    w, _ = _int4_weights()
    with pytest.raises(ValueError, match="weights.x_scale"):
        mamba_step(torch.randn(1, 64), w._replace(x_scale=w.x_scale[:, :1].expand(-1, 3)),
                   torch.zeros(1, 64, 3), torch.zeros(1, 64, 4))

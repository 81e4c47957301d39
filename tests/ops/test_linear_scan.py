import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import linear_scan
from ssmkit.ops import reference as R


def rel_err(x, y):
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        mag = torch.rand(shape, generator=g, dtype=real) * 0.98
        ph = torch.rand(shape, generator=g, dtype=real) * 6.28
        a = torch.polar(mag, ph)
        b = torch.complex(torch.randn(shape, generator=g, dtype=real), torch.randn(shape, generator=g, dtype=real))
    else:
        a = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1  # negative decays too
        b = torch.randn(shape, generator=g, dtype=dtype)
    return a, b


def run_both(a, b, **kw):
    """Forward, final state and all gradients of the fused op and the oracle."""
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    h0 = kw.pop("initial_state", None)
    results = []
    for fn in (linear_scan, R.linear_scan):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        s0 = None if h0 is None else h0.detach().clone().requires_grad_()
        y, hf = fn(*ins, initial_state=s0, return_final_state=True, **kw)
        g = torch.ones_like(y) * (1 + 0.5j if y.is_complex() else 1.0) + torch.linspace(0, 1, y.numel()).reshape(
            y.shape
        ).to(y.dtype)
        loss = (y * g.conj()).real.sum() + (hf * hf.conj()).real.sum()
        grads = torch.autograd.grad(loss, ins + ([] if s0 is None else [s0]))
        results.append((y, hf, grads))
    return results


@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 70),
    chans=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.complex64, torch.complex128]),
    use_h0=st.booleans(),
    use_reset=st.booleans(),
    reverse=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_reference(batch, length, chans, dtype, use_h0, use_reset, reverse, seed):
    shape = (batch, length, *chans)
    a, b = make(shape, dtype, seed)
    kw = {"reverse": reverse}
    if use_h0:
        kw["initial_state"] = make((batch, *chans), dtype, seed + 1)[1]
    if use_reset:
        kw["reset"] = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.2
    (y, hf, g), (yr, hr, gr) = run_both(a, b, **kw)
    tol = 1e-10 if dtype in (torch.float64, torch.complex128) else 1e-5
    assert rel_err(y, yr) < tol
    assert rel_err(hf, hr) < tol
    for x, xr in zip(g, gr, strict=True):
        assert rel_err(x, xr) < tol


@given(length=st.integers(2, 80), reverse=st.booleans(), seed=st.integers(0, 1000))
def test_split_state_equals_whole(length, reverse, seed):
    a, b = make((2, length, 6), torch.float64, seed)
    t = 1 + seed % (length - 1)
    y = linear_scan(a, b, reverse=reverse)
    if not reverse:
        y1, s = linear_scan(a[:, :t], b[:, :t], return_final_state=True)
        y2 = linear_scan(a[:, t:], b[:, t:], initial_state=s)
    else:
        y2, s = linear_scan(a[:, t:], b[:, t:], reverse=True, return_final_state=True)
        y1 = linear_scan(a[:, :t], b[:, :t], initial_state=s, reverse=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_reset_equals_separate_sequences(reverse):
    a, b = make((1, 30, 4), torch.float64, 3)
    starts = [0, 7, 8, 20]
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, starts] = True
    y = linear_scan(a, b, reset=reset, reverse=reverse)
    bounds = starts + [30]
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        alone = linear_scan(a[:, s:e], b[:, s:e], reverse=reverse)
        torch.testing.assert_close(y[:, s:e], alone, rtol=1e-12, atol=1e-12)


def test_bf16_close_to_fp32():
    a, b = make((2, 200, 16), torch.float32, 0)
    a = a.abs() * 0.9
    y32 = linear_scan(a, b)
    y16 = linear_scan(a.bfloat16(), b.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16.float(), y32) < 1e-2


def test_gradcheck_float64():
    a, b = make((2, 9, 3), torch.float64, 1)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    reset = torch.tensor([[False, True] + [False] * 7, [False] * 5 + [True] + [False] * 3])
    for reverse in (False, True):
        torch.autograd.gradcheck(
            lambda a, b, h, reverse=reverse: linear_scan(a, b, initial_state=h, reset=reset, reverse=reverse),
            (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_()),
        )


def test_bad_input_errors():
    a, b = make((2, 5, 3), torch.float32, 0)
    with pytest.raises(ValueError, match=r"a must have shape \(2, 5, 3\).*got \(2, 5, 1\)"):
        linear_scan(a[..., :1], b)
    with pytest.raises(ValueError, match=r"b must have rank >= 2"):
        linear_scan(a[0, 0], b[0, 0])
    with pytest.raises(TypeError, match="a has dtype torch.float64 but b has dtype torch.float32"):
        linear_scan(a.double(), b)
    with pytest.raises(ValueError, match=r"reset must have shape \(batch, length\) = \(2, 5\)"):
        linear_scan(a, b, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="reset must have dtype torch.bool"):
        linear_scan(a, b, reset=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 3\)"):
        linear_scan(a, b, initial_state=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        linear_scan(a, [1, 2])
    with pytest.raises(ValueError, match="length >= 1"):
        linear_scan(a[:, :0], b[:, :0])

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import fft_conv
from ssmkit.ops import reference as R
from ssmkit.ops.fft_conv import fast_fft_size


def rel_err(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12)).item()


def make(batch, length, channels, K, bidirectional=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g, dtype=torch.float64)
    k = torch.randn(*((2,) if bidirectional else ()), channels, K, generator=g, dtype=torch.float64)
    k = k / (1 + torch.arange(K, dtype=torch.float64))  # decaying taps, like a learned long-conv kernel
    D = torch.randn(channels, generator=g, dtype=torch.float64)
    return u.to(dtype), k.to(dtype), D.to(dtype)


def run(fn, u, k, D, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (u, k) + (() if D is None else (D,))]
    y = fn(*leaves[:2], D=None if D is None else leaves[2], **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad((y * w).sum(), leaves)


@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 50),
    channels=st.integers(1, 4),
    K=st.integers(1, 80),
    bidirectional=st.booleans(),
    use_D=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_matches_reference(batch, length, channels, K, bidirectional, use_D, dtype, seed):
    u, k, D = make(batch, length, channels, K, bidirectional, dtype, seed)
    D = D if use_D else None
    y, grads = run(fft_conv, u, k, D, bidirectional=bidirectional)
    # float64 oracle on the same values: measures the op's own error
    yr, grads_r = run(R.fft_conv, u.double(), k.double(), None if D is None else D.double(),
                      bidirectional=bidirectional)
    assert y.dtype == dtype and y.shape == u.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(y, yr) < tol
    assert len(grads) == len(grads_r)
    for name, g, gr in zip(["u", "k", "D"], grads, grads_r, strict=False):
        assert rel_err(g, gr) < tol, name


@given(length=st.integers(1, 40), K=st.integers(1, 60), seed=st.integers(0, 1000))
def test_matches_toeplitz_matrix(length, K, seed):
    u, k, _ = make(2, length, 3, K, seed=seed)
    assert rel_err(fft_conv(u, k), R.direct_conv_matrix(u, k)) < 1e-10


@given(length=st.integers(1, 40), K=st.integers(1, 60), seed=st.integers(0, 1000))
def test_bidirectional_is_causal_plus_flipped_anticausal(length, K, seed):
    """The anti-causal half equals a causal conv of the time-reversed input, reversed back."""
    u, k, _ = make(2, length, 3, K, bidirectional=True, seed=seed)
    expected = R.direct_conv_matrix(u, k[0]) + R.direct_conv_matrix(u.flip(1), k[1]).flip(1)
    assert rel_err(fft_conv(u, k, bidirectional=True), expected) < 1e-10


def test_kernel_taps_beyond_length_are_unused():
    u, k, D = make(2, 10, 3, 25, bidirectional=True)
    kk = k.clone().requires_grad_()
    y = fft_conv(u, kk, D=D, bidirectional=True)
    k2 = k.clone()
    k2[..., 10:] = 1e3
    assert torch.equal(y, fft_conv(u, k2, D=D, bidirectional=True))
    (g,) = torch.autograd.grad(y.sum(), kk)
    assert (g[..., 10:] == 0).all() and (g[..., :10] != 0).any()


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
def test_long_sequences_no_wraparound(length):
    """A kernel as long as the sequence: any circular wrap-around in the FFT would show up here."""
    for bidirectional in (False, True):
        u, k, D = make(1, length, 2, length, bidirectional, seed=length)
        y = fft_conv(u, k, D=D, bidirectional=bidirectional)
        assert rel_err(y, R.fft_conv(u, k, D=D, bidirectional=bidirectional)) < 1e-10


def test_fast_fft_size():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    good = [m for m in range(2, 2100) if m % 2 == 0 and smooth(m)]
    for n in range(1, 2049):
        assert fast_fft_size(n) == min(m for m in good if m >= n)
    assert fast_fft_size(8193) == 8640


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck(bidirectional):
    u, k, D = make(1, 6, 2, 4, bidirectional, seed=3)
    ins = [t.clone().requires_grad_() for t in (u, k, D)]
    assert torch.autograd.gradcheck(lambda u, k, D: fft_conv(u, k, D=D, bidirectional=bidirectional), ins)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_16bit_close_to_float32(dtype, bidirectional):
    u, k, D = make(2, 300, 8, 300, bidirectional, dtype=dtype, seed=2)
    y = fft_conv(u, k, D=D, bidirectional=bidirectional)
    assert y.dtype == dtype
    y32 = fft_conv(u.float(), k.float(), D=D.float(), bidirectional=bidirectional)
    assert rel_err(y.float(), y32) < 1e-2


def _bad_cases():
    u, k, D = make(2, 10, 3, 5, dtype=torch.float32)
    k2 = torch.randn(2, 3, 5)
    return [
        (dict(u=u[0]), ValueError, r"u must have rank 3"),
        (dict(k=k[0]), ValueError, r"k must have rank 2"),
        (dict(k=k[:2]), ValueError, r"k must have shape \(3, 5\)"),
        (dict(k=k[:, :0]), ValueError, r"k must have kernel_len >= 1"),
        (dict(k=k.double()), TypeError, r"k has dtype torch.float64 but u has dtype torch.float32"),
        (dict(D=D[:2]), ValueError, r"D must have shape \(3,\)"),
        (dict(D=D.double()), TypeError, r"D has dtype"),
        (dict(k=k2), ValueError, r"k must have rank 2"),
        (dict(bidirectional=True), ValueError, r"k must have rank 3.*bidirectional=True"),
        (dict(k=torch.randn(3, 3, 5), bidirectional=True), ValueError, r"k must have shape \(2, 3, 5\)"),
        (dict(k=k2[:, :2], bidirectional=True), ValueError, r"k must have shape \(2, 3, 5\)"),
        (dict(bidirectional=1), TypeError, r"bidirectional must be a bool"),
        (dict(u=u[:, :0]), ValueError, r"u must have length >= 1"),
        (dict(u=u.to(torch.complex64), k=k.to(torch.complex64)), TypeError, r"real tensors"),
        (dict(u=u.numpy()), TypeError, r"u must be a torch.Tensor"),
    ], dict(u=u, k=k, D=D)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input_names_the_argument(case):
    cases, base = _bad_cases()
    change, exc, match = cases[case]
    kw = {**base, **change}
    with pytest.raises(exc, match=match):
        fft_conv(kw.pop("u"), kw.pop("k"), **kw)

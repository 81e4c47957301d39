import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.ops import fused_kernels, selective_scan
from ssmkit.ops import reference as R
from ssmkit.ops._numba_kernels import SS_BLOCK, SS_CHUNK

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel_err(x, y):
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()


def make_inputs(batch, length, dim, N, groups, dtype, seed, *, with_D=True, with_z=True, with_bias=True, h0=True):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) * scale

    bc = (batch, length, N) if groups is None else (batch, length, groups, N)
    return {
        "u": rn(batch, length, dim),
        "delta": rn(batch, length, dim, scale=0.5),
        "A": -torch.rand(dim, N, generator=g, dtype=torch.float64).to(dtype) * 2,
        "B": rn(*bc),
        "C": rn(*bc),
        "D": rn(dim) if with_D else None,
        "z": rn(batch, length, dim) if with_z else None,
        "delta_bias": rn(dim, scale=0.3) if with_bias else None,
        "initial_state": rn(batch, dim, N) if h0 else None,
    }


def forward_and_grads(fn, inp, **kw):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inp.items()}
    args = [leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    y, h = fn(*args, delta_bias=leaves["delta_bias"], initial_state=leaves["initial_state"],
              return_final_state=True, **kw)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    loss = (y * gy).sum() + (h * h.conj()).real.sum()  # |h|^2, for a complex state too
    live = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in live])
    return y, h, dict(zip(live, grads, strict=True))


def compare(inp, tol, **kw):
    y, h, g = forward_and_grads(selective_scan, inp, **kw)
    yr, hr, gr = forward_and_grads(R.selective_scan, inp, **kw)
    assert rel_err(y, yr) < tol, "forward"
    assert rel_err(h, hr) < tol, "final state"
    for k in gr:
        assert rel_err(g[k], gr[k]) < tol, f"grad of {k}: {rel_err(g[k], gr[k]):.2e}"
    # inference (no gradients): the kernel applies delta_bias and softplus itself
    with torch.no_grad():
        args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
        yn, hn = selective_scan(*args, delta_bias=inp["delta_bias"], initial_state=inp["initial_state"],
                                return_final_state=True, **kw)
    assert rel_err(yn, yr) < tol and rel_err(hn, hr) < tol, "no-grad forward"


@given(
    batch=st.integers(1, 2),
    length=st.sampled_from([1, 2, SS_CHUNK - 1, SS_CHUNK, SS_CHUNK + 1, 3 * SS_CHUNK + 5]),
    dim_mult=st.integers(1, 3),
    N=st.integers(1, 6),
    groups=st.sampled_from([None, 1, 2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    reverse=st.booleans(),
    softplus=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_reference(batch, length, dim_mult, N, groups, dtype, flags, reverse, softplus, seed):
    with_D, with_z, h0, use_reset = flags
    dim = 2 * dim_mult + (SS_BLOCK if seed % 3 == 0 else 0)  # sometimes several channel blocks per group
    inp = make_inputs(batch, length, dim, N, groups, dtype, seed, with_D=with_D, with_z=with_z, h0=h0)
    if not softplus:  # without softplus the caller passes dt itself, which is positive (else the scan can blow up)
        inp["delta"] = inp["delta"].abs()
        inp["delta_bias"] = inp["delta_bias"].abs()
    reset = (torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.1) if use_reset else None
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    compare(inp, tol, delta_softplus=softplus, reset=reset, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_softplus_threshold_in_inference(dtype):
    """Step sizes on both sides of softplus' linear threshold (20), through the kernel's own softplus."""
    inp = make_inputs(2, 40, 70, 3, None, dtype, 5)
    inp["delta"] = inp["delta"] * 30
    inp["A"] = inp["A"] * 0.01
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    with torch.no_grad():
        y = selective_scan(*args, delta_bias=inp["delta_bias"], delta_softplus=True)
    yr = R.selective_scan(*[a.double() for a in args], delta_bias=inp["delta_bias"].double(), delta_softplus=True)
    assert bool((inp["delta"] > 20).any() and (inp["delta"] < 20).any())
    assert rel_err(y.double(), yr) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_softplus_and_bias_gradients_across_threshold(dtype, tol):
    """The kernels apply delta_bias and softplus with gradients too (d softplus = sigmoid, 1 above 20): outputs and
    every gradient, delta_bias' included, equal the oracle's on both sides of the threshold; no torch softplus
    node is left in the graph."""
    inp = make_inputs(2, 3 * SS_CHUNK + 7, SS_BLOCK + 5, 4, None, dtype, 9)
    inp["delta"] = inp["delta"] * 30
    inp["A"] = inp["A"] * 0.01
    assert bool((inp["delta"] + inp["delta_bias"] > 20).any() and (inp["delta"] + inp["delta_bias"] < 20).any())
    y, h, g = forward_and_grads(selective_scan, inp, delta_softplus=True)
    yr, hr, gr = forward_and_grads(R.selective_scan, inp, delta_softplus=True)
    assert rel_err(y, yr) < tol and rel_err(h, hr) < tol
    for k in gr:
        assert rel_err(g[k], gr[k]) < tol, k
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    out = selective_scan(*(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z")),
                         delta_bias=leaves["delta_bias"], delta_softplus=True)
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    assert not {n for n in names if "Softplus" in n or n == "AddBackward0"}, names


def test_many_blocks_and_groups_float32():
    inp = make_inputs(2, 100, 3 * SS_BLOCK + 6, 16, 3, torch.float32, 7)
    compare(inp, 1e-5, delta_softplus=True, reset=torch.rand(2, 100) < 0.05)


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_path_matches_reference(reverse):
    inp = make_inputs(2, 45, 6, 4, 2, torch.float64, 3)
    reset = torch.rand(2, 45, generator=torch.Generator().manual_seed(0)) < 0.1
    with fused_kernels(False):
        y, h, g = forward_and_grads(selective_scan, inp, delta_softplus=True, reset=reset, reverse=reverse)
    yr, hr, gr = forward_and_grads(R.selective_scan, inp, delta_softplus=True, reset=reset, reverse=reverse)
    assert rel_err(y, yr) < 1e-10 and rel_err(h, hr) < 1e-10
    for k in gr:
        assert rel_err(g[k], gr[k]) < 1e-10, k


@given(length=st.integers(2, 120), reverse=st.booleans(), seed=st.integers(0, 1000))
def test_split_state_equals_whole(length, reverse, seed):
    inp = make_inputs(2, length, 5, 3, None, torch.float64, seed, h0=False)
    t = 1 + seed % (length - 1)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]

    def part(s, e, state):
        sl = [a[:, s:e] if a is not None and a.ndim == 3 else a for a in args]
        return selective_scan(*sl, delta_bias=inp["delta_bias"], delta_softplus=True, initial_state=state,
                              reverse=reverse, return_final_state=True)

    y, hT = part(0, length, None)
    if not reverse:
        y1, s = part(0, t, None)
        y2, s2 = part(t, length, s)
    else:
        y2, s = part(t, length, None)
        y1, s2 = part(0, t, s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, hT, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_reset_equals_separate_sequences(reverse):
    inp = make_inputs(1, 40, 6, 4, None, torch.float64, 5, h0=False)
    starts = [0, 1, 13, 30]
    reset = torch.zeros(1, 40, dtype=torch.bool)
    reset[0, starts] = True
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    kw = {"delta_bias": inp["delta_bias"], "delta_softplus": True, "reverse": reverse}
    y = selective_scan(*args, reset=reset, **kw)
    for s, e in zip(starts, starts[1:] + [40], strict=True):
        sl = [a[:, s:e] if a is not None and a.ndim == 3 else a for a in args]
        torch.testing.assert_close(y[:, s:e], selective_scan(*sl, **kw), rtol=1e-12, atol=1e-12)


def test_bf16_close_to_fp32():
    inp = make_inputs(1, 300, 64, 16, None, torch.float32, 11)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    y32 = selective_scan(*args, delta_bias=inp["delta_bias"], delta_softplus=True)
    y16 = selective_scan(*[a.bfloat16() for a in args], delta_bias=inp["delta_bias"].bfloat16(), delta_softplus=True)
    assert y16.dtype == torch.bfloat16
    # compare against fp32 run on the bf16-rounded inputs' scale
    assert rel_err(y16.float(), y32) < 1e-2 * 3


def test_gradcheck_float64():
    inp = make_inputs(1, 7, 3, 2, None, torch.float64, 2)
    names = [k for k in NAMES if inp[k] is not None]
    reset = torch.tensor([[False, False, True, False, False, False, False]])

    def fn(*xs):
        d = dict(zip(names, xs, strict=True))
        return selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],
                              delta_bias=d["delta_bias"], delta_softplus=True, initial_state=d["initial_state"],
                              reset=reset, return_final_state=True)

    torch.autograd.gradcheck(fn, tuple(inp[k].requires_grad_() for k in names))


def test_no_big_state_tensor_saved():
    """The autograd graph keeps inputs and chunk checkpoints only: far less than (B, L, D, N)."""
    inp = make_inputs(1, 512, 64, 64, None, torch.float32, 0, h0=False)
    leaves = [inp[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z")]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(*leaves, delta_softplus=True)
    # inputs are O(L*D) each; the state checkpoints are (L/chunk)*D*N
    assert sum(saved) < 512 * 64 * 64 / 4


def test_bad_input_errors():
    inp = make_inputs(2, 5, 4, 3, None, torch.float32, 0)
    u, delta, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"u must have rank 3 \(batch, length, dim\), got shape \(5, 4\)"):
        selective_scan(u[0], delta, A, B, C)
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 5, 4\).*got \(2, 4, 4\)"):
        selective_scan(u, delta[:, :4], A, B, C)
    with pytest.raises(ValueError, match=r"B has 3 groups.*groups must divide dim=4"):
        selective_scan(u, delta, A, torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"A must have shape \(dim, N\) with dim=4"):
        selective_scan(u, delta, A[:3], B, C)
    with pytest.raises(TypeError, match="B has dtype torch.float64 but u has dtype torch.float32"):
        selective_scan(u, delta, A, B.double(), C)
    with pytest.raises(ValueError, match=r"reset must have shape \(batch, length\) = \(2, 5\), got \(5,\)"):
        selective_scan(u, delta, A, B, C, reset=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"D must have shape \(4,\)"):
        selective_scan(u, delta, A, B, C, D=torch.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 4, 3\)"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match=r"C must have shape \(2, 5, 3\)"):
        selective_scan(u, delta, A, B, C[:, :, :2])


# ------------------------------------------------------------------------------------- complex A (Mamba's variant)
CPLX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def complex_inputs(batch, length, dim, N, groups, dtype, seed):
    """Real u, delta, z, D, delta_bias in ``dtype``; A, B, C, initial_state in the matching complex dtype."""
    inp = make_inputs(batch, length, dim, N, groups, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    im = (lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype))  # noqa: E731
    for k in ("A", "B", "C", "initial_state"):
        inp[k] = torch.complex(inp[k], im(inp[k]) * (3.0 if k == "A" else 1.0))
    return inp


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("groups,reverse,use_reset", [(None, False, False), (2, True, True), (None, True, False),
                                                      (2, False, True)])
def test_complex_A_matches_loop_oracle(dtype, tol, groups, reverse, use_reset):
    inp = complex_inputs(2, 70, 4, 3, groups, dtype, seed=5)  # 70 > the torch path's 64-step chunk
    reset = torch.rand(2, 70, generator=torch.Generator().manual_seed(2)) < 0.1 if use_reset else None
    kw = dict(delta_softplus=True, reverse=reverse, reset=reset)
    y, h, g = forward_and_grads(selective_scan, inp, **kw)
    yr, hr, gr = forward_and_grads(R.selective_scan, inp, **kw)
    assert y.dtype == dtype and h.dtype == CPLX[dtype]
    assert rel_err(y, yr) < tol and rel_err(h, hr) < tol
    for k in gr:
        assert g[k].dtype == inp[k].dtype and rel_err(g[k], gr[k]) < tol, k


def test_complex_A_gradcheck_complex128():
    inp = complex_inputs(1, 6, 2, 2, None, torch.float64, seed=3)
    names = [k for k in NAMES if inp[k] is not None]
    reset = torch.tensor([[False, False, False, True, False, False]])

    def fn(*xs):
        d = dict(zip(names, xs, strict=True))
        return selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], delta_bias=d["delta_bias"],
                              delta_softplus=True, initial_state=d["initial_state"], reset=reset,
                              return_final_state=True)

    torch.autograd.gradcheck(fn, tuple(inp[k].requires_grad_() for k in names))


def test_complex_A_with_real_values_is_twice_the_real_scan():
    """A real A, B, C written as complex numbers: the conjugate-pair convention doubles the C·h term, so the
    complex path equals 2x the fused real kernel's output (without D and z, which are not doubled)."""
    inp = make_inputs(2, 40, 8, 4, 2, torch.float64, seed=9)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    as_c = [a if i < 2 else a.to(torch.complex128) for i, a in enumerate(args)]
    y_real = selective_scan(*args, delta_bias=inp["delta_bias"], delta_softplus=True)
    y_c = selective_scan(*as_c, delta_bias=inp["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(y_c, 2 * y_real, rtol=1e-12, atol=1e-12)


def test_complex_A_bad_dtypes():
    inp = complex_inputs(1, 5, 4, 3, None, torch.float32, seed=0)
    u, delta, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(TypeError, match=r"^A has dtype torch.complex64 but a complex A with u torch.float64 needs A "
                                        r"torch.complex128$"):
        selective_scan(u.double(), delta.double(), A, B.to(torch.complex128), C.to(torch.complex128))
    with pytest.raises(TypeError, match=r"B has dtype torch.float32 but a complex A with u torch.float32 needs B"):
        selective_scan(u, delta, A, B.real.contiguous(), C)  # nothing is cast to complex silently
    with pytest.raises(TypeError, match=r"a complex A needs float32 or float64 u .*got u torch.bfloat16"):
        selective_scan(u.bfloat16(), delta.bfloat16(), A, B, C)
    with pytest.raises(TypeError, match=r"u must be real"):
        selective_scan(u.to(torch.complex64), delta, A, B, C)
    with pytest.raises(TypeError, match=r"initial_state must have dtype torch.complex64"):
        selective_scan(u, delta, A, B, C, initial_state=inp["initial_state"].real.contiguous())

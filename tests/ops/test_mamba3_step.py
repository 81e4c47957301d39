"""The fused (numba) one-token Mamba-3 step against the loop oracle, the torch step and the fused forward."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import Mamba3ScanState, fused_kernels, mamba3, mamba3_step
from ssmkit.ops import reference_mamba3 as R3


def make_step(batch, heads, P, groups, N, rank, S, *, angles=True, bias=True, D=True, A_per_batch=False, seed=0,
              dtype=torch.float64):
    """One token's arguments (rank None: SISO) and a random state, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    r = (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype))  # noqa: E731
    lead = (batch,) if rank is None else (batch, rank)
    A = -torch.nn.functional.softplus(r(batch, heads) if A_per_batch else r(heads)) - 0.05
    args = [r(*lead, heads, P), torch.nn.functional.softplus(r(batch, heads) - 1), A,
            torch.rand(batch, heads, generator=g, dtype=torch.float64).to(dtype), r(*lead, groups, N),
            r(*lead, groups, N)]
    bshape = (heads, N) if rank is None else (heads, rank, N)
    kw = {"angles": r(batch, heads, S) if angles else None, "B_bias": r(*bshape) if bias else None,
          "C_bias": r(*bshape) if bias else None, "D": r(heads) if D else None}
    state = Mamba3ScanState(r(batch, heads, S).abs() * 3, r(batch, heads, P, N), r(*lead, heads, N),
                            r(*lead, heads, P))
    return args, kw, state


def oracle_step(args, kw, state):
    """The loop oracle on a length-1 sequence from ``state``."""
    x, dt, A, trap, B, C = args
    A1 = A if A.ndim == 1 else A[:, None]
    y, st_ = R3.mamba3(x[:, None], dt[:, None], A1, trap[:, None], B[:, None], C[:, None],
                       angles=None if kw["angles"] is None else kw["angles"][:, None], B_bias=kw["B_bias"],
                       C_bias=kw["C_bias"], D=kw["D"], initial_state=tuple(state), return_final_state=True)
    return y[:, 0], st_


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), groups=st.integers(1, 2), rep=st.integers(1, 3), P=st.integers(1, 5),
       N=st.integers(2, 9), rank=st.sampled_from([None, 1, 2, 4]), S=st.integers(0, 3), angles=st.booleans(),
       bias=st.booleans(), D=st.booleans(), A_per_batch=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_step_matches_oracle(batch, groups, rep, P, N, rank, S, angles, bias, D, A_per_batch, seed):
    S = min(S, N // 2) if angles else 0  # without angles the oracle has no angle state
    args, kw, state = make_step(batch, groups * rep, P, groups, N, rank, S, angles=angles, bias=bias, D=D,
                                A_per_batch=A_per_batch, seed=seed)
    before = [t.clone() for t in state]
    y, new = mamba3_step(*args, state, **kw)
    yr, sr = oracle_step(args, kw, state)
    close(y, yr, 1e-12)
    for a, b in zip(new, sr, strict=True):
        close(a, b, 1e-12)
    for a, b in zip(state, before, strict=True):  # the state passed in is only read
        assert torch.equal(a, b)
    assert all(t.is_contiguous() for t in new)


@pytest.mark.parametrize("rank", [None, 3])
def test_kernel_step_equals_torch_step(rank):
    """Also without angles but with a non-empty angle state: B and C still turn by the state's angles."""
    for angles in (True, False):
        args, kw, state = make_step(2, 4, 3, 2, 6, rank, 2, angles=angles, seed=3)
        y, new = mamba3_step(*args, state, **kw)
        with fused_kernels(False):
            yt, nt = mamba3_step(*args, state, **kw)
        close(y, yt, 1e-12)
        for a, b in zip(new, nt, strict=True):
            close(a, b, 1e-12)


@pytest.mark.parametrize("rank", [None, 2])
def test_kernel_step_is_the_fused_forward_on_one_token(rank):
    args, kw, state = make_step(2, 4, 3, 1, 6, rank, 2, seed=5, dtype=torch.float32)
    x, dt, A, trap, B, C = args
    y, new = mamba3_step(*args, state, **kw)
    yf, sf = mamba3(x[:, None], dt[:, None], A, trap[:, None], B[:, None], C[:, None], angles=kw["angles"][:, None],
                    B_bias=kw["B_bias"], C_bias=kw["C_bias"], D=kw["D"], initial_state=state,
                    return_final_state=True)
    assert torch.equal(y, yf[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(new, sf, strict=True))


def test_float32_and_16bit_inputs():
    args, kw, state = make_step(2, 4, 8, 2, 16, None, 4, seed=7)
    yr, sr = oracle_step(args, kw, state)
    a32 = [t.float() for t in args]
    k32 = {k: v.float() for k, v in kw.items()}
    s32 = Mamba3ScanState(*(t.float() for t in state))
    y, new = mamba3_step(*a32, s32, **k32)
    assert y.dtype == torch.float32
    close(y.double(), yr, 1e-5)
    for a, b in zip(new, sr, strict=True):
        close(a.double(), b, 1e-5)
    # bfloat16 activations with float32 parameters and state (the layer's mixed precision)
    y16, new16 = mamba3_step(*[t.bfloat16() for t in a32], s32, angles=k32["angles"].bfloat16(),
                             B_bias=k32["B_bias"], C_bias=k32["C_bias"], D=k32["D"])
    assert y16.dtype == torch.bfloat16 and new16.ssm.dtype == torch.float32
    close(new16.ssm.double(), sr[1], 5e-2)


def test_gradients_take_the_torch_path():
    args, kw, state = make_step(1, 2, 3, 1, 4, 2, 1, seed=9)
    x = args[0].clone().requires_grad_()
    y, new = mamba3_step(x, *args[1:], state, **kw)
    (y.sum() + new.ssm.sum()).backward()
    xr = args[0].clone().requires_grad_()
    yr, sr = oracle_step([xr, *args[1:]], kw, state)
    (yr.sum() + sr[1].sum()).backward()
    close(x.grad, xr.grad, 1e-12)


def test_bad_step_inputs_are_named():
    args, kw, state = make_step(2, 4, 3, 2, 6, None, 2, seed=11)
    x, dt, A, trap, B, C = args
    cases = [
        (dict(dt=dt[:, :3]), ValueError, r"dt must have shape \(2, 4\)"),
        (dict(trap=trap[:1]), ValueError, r"trap must have shape \(2, 4\)"),
        (dict(A=A[:3]), ValueError, r"A must have shape \(4,\)"),
        (dict(B=B[..., :5], C=C[..., :5]), ValueError, r"B must have shape \(2, 2, 6\)"),
        (dict(B=x.new_zeros(2, 3, 6), C=x.new_zeros(2, 3, 6)), ValueError, r"groups must divide heads"),
        (dict(C=C[:, :1]), ValueError, r"C must have shape"),
        (dict(x=x[:, :3]), ValueError, r"x \(2, 3, 3\) does not match"),
        (dict(angles=kw["angles"][..., :1]), ValueError, r"angles must have shape \(2, 4, 2\)"),
        (dict(B_bias=kw["B_bias"][:, :5]), ValueError, r"B_bias must have shape \(4, 6\)"),
        (dict(D=kw["D"][:2]), ValueError, r"D must have shape \(4,\)"),
        (dict(dt=dt.float()), TypeError, r"dt has dtype"),
        (dict(state=state._replace(k=state.k[:, :3])), ValueError, r"state.k must have shape \(2, 4, 6\)"),
        (dict(state=state._replace(ssm=state.ssm.float())), TypeError, r"state.ssm must be a torch.float64"),
        (dict(state=state._replace(angle=state.angle.expand(2, 4, 2).repeat(1, 1, 2))), ValueError,
         r"2 \* S must be <= N"),
    ]
    for change, exc, match in cases:
        a = dict(x=x, dt=dt, A=A, trap=trap, B=B, C=C, state=state, **kw)
        a.update(change)
        with pytest.raises(exc, match=match):
            mamba3_step(a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("trap"), a.pop("B"), a.pop("C"), a.pop("state"),
                        **a)


def test_kernel_only_below_the_work_limit(monkeypatch):
    """Small states take the kernel, larger ones the torch step (faster there); both match the oracle."""
    M3 = importlib.import_module("ssmkit.ops.mamba3")  # the module (the package exports a function of that name)
    calls = []
    real = M3.fused_step
    monkeypatch.setattr(M3, "fused_step", lambda *a: calls.append(1) or real(*a))
    small = make_step(1, 2, 4, 1, 8, None, 2, seed=13)
    large = make_step(8, 4, 64, 2, 128, None, 8, seed=13)  # 8 * 4 * 64 * 128 * 3 multiply-adds > 2^18
    for (args, kw, state), fused in ((small, True), (large, False)):
        calls.clear()
        y, new = mamba3_step(*args, state, **kw)
        assert bool(calls) is fused
        yr, sr = oracle_step(args, kw, state)
        close(y, yr, 1e-12)
        for a, b in zip(new, sr, strict=True):
            close(a, b, 1e-12)

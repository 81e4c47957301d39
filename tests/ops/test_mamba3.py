import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import Mamba3ScanState, fused_kernels, mamba3, mamba3_step, ssd
from ssmkit.ops import reference as R


def make(batch, length, heads, P, groups, N, rank=None, S=1, *, angles=True, bias=True, D=True, state=True,
         seed=0, dtype=torch.float64):
    """Random Mamba-3 inputs (rank None: SISO). Returns (args, kwargs) for mamba3 / its oracle."""
    g = torch.Generator().manual_seed(seed)
    r = (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64))  # noqa: E731
    lead = (batch, length) if rank is None else (batch, length, rank)
    args = [r(*lead, heads, P), F.softplus(r(batch, length, heads) - 1), -F.softplus(r(batch, length, heads)) - 0.05,
            torch.rand(batch, length, heads, generator=g, dtype=torch.float64), r(*lead, groups, N),
            r(*lead, groups, N)]
    bshape = (heads, N) if rank is None else (heads, rank, N)
    kx = (batch, heads) if rank is None else (batch, rank, heads)
    kw = {"angles": r(batch, length, heads, S) if angles else None, "B_bias": r(*bshape) if bias else None,
          "C_bias": r(*bshape) if bias else None, "D": r(heads) if D else None}
    if state:
        s = S if angles else 0
        kw["initial_state"] = Mamba3ScanState(r(batch, heads, s).abs(), r(batch, heads, P, N), r(*kx, N), r(*kx, P))
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    args = [cast(t) for t in args]
    kw = {k: (Mamba3ScanState(*map(cast, v)) if k == "initial_state" else cast(v)) for k, v in kw.items()}
    return args, kw


def leaves(args, kw):
    """Fresh leaf copies (requires_grad) of every tensor input, and the flat list of them."""
    args = [t.detach().clone().requires_grad_() for t in args]
    kw = dict(kw)
    for k in ("angles", "B_bias", "C_bias", "D"):
        if kw.get(k) is not None:
            kw[k] = kw[k].detach().clone().requires_grad_()
    if kw.get("initial_state") is not None:
        kw["initial_state"] = Mamba3ScanState(*(t.detach().clone().requires_grad_() for t in kw["initial_state"]))
    flat = args + [kw[k] for k in ("angles", "B_bias", "C_bias", "D") if kw.get(k) is not None]
    flat += list(kw["initial_state"]) if kw.get("initial_state") is not None else []
    return args, kw, flat


def run(fn, args, kw, **extra):
    """Output, final state and the gradients of a fixed random loss w.r.t. every input."""
    args, kw, flat = leaves(args, kw)
    y, st_ = fn(*args, **kw, return_final_state=True, **extra)
    g = torch.Generator().manual_seed(123)
    outs = [y, *st_]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, flat)


def assert_all_close(a, b, tol=1e-10):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol, msg=lambda m, i=i: f"item {i}: {m}")


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 70), groups=st.integers(1, 2), rep=st.integers(1, 2),
       P=st.integers(1, 3), N=st.integers(2, 5), rank=st.sampled_from([None, 1, 2, 3]), S=st.integers(0, 2),
       angles=st.booleans(), bias=st.booleans(), D=st.booleans(), state=st.booleans(), use_reset=st.booleans(),
       reverse=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_matches_oracle(batch, length, groups, rep, P, N, rank, S, angles, bias, D, state, use_reset, reverse,
                               seed):
    S = min(S, N // 2)
    args, kw = make(batch, length, groups * rep, P, groups, N, rank, S, angles=angles, bias=bias, D=D, state=state,
                    seed=seed)
    reset = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.15 if use_reset else None
    out, grads = run(mamba3, args, kw, reset=reset, reverse=reverse)
    out_r, grads_r = run(R.mamba3, args, kw, reset=reset, reverse=reverse)
    assert_all_close(out, out_r)
    assert_all_close(grads, grads_r)


@pytest.mark.parametrize("rank", [None, 2])
def test_kernel_matches_oracle_wide(rank):
    """N and P past the kernel's 8-lane dot products (and their tails), with resets, reverse and all options."""
    args, kw = make(2, 45, 4, 11, 2, 13, rank, 3, seed=29)
    reset = torch.rand(2, 45, generator=torch.Generator().manual_seed(2)) < 0.1
    for reverse in (False, True):
        out, grads = run(mamba3, args, kw, reset=reset, reverse=reverse)
        out_r, grads_r = run(R.mamba3, args, kw, reset=reset, reverse=reverse)
        assert_all_close(out, out_r)
        assert_all_close(grads, grads_r)


@pytest.mark.parametrize("reverse", [False, True])
def test_euler_end_without_rotation_is_ssd(reverse):
    """trap = 1 (exponential Euler), no rotation, no biases, SISO: Mamba-2's SSD (its chunked algorithm)."""
    args, kw = make(2, 45, 4, 3, 2, 5, angles=False, bias=False, state=False, seed=3)
    x, dt, A, trap, B, C = args
    A = A[0, 0]  # SSD's A is one rate per head
    trap = torch.ones_like(trap)
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    reset = torch.rand(2, 45, generator=torch.Generator().manual_seed(1)) < 0.1
    zero_kx = (torch.zeros(2, 4, 5, dtype=torch.float64), torch.zeros(2, 4, 3, dtype=torch.float64))
    st0 = Mamba3ScanState(torch.zeros(2, 4, 0, dtype=torch.float64), h0, *zero_kx)

    def m3(x, dt, A, B, C, D, h0):
        return mamba3(x, dt, A, trap, B, C, D=D, initial_state=st0._replace(ssm=h0), reset=reset, reverse=reverse,
                      return_final_state=True)

    def m2(x, dt, A, B, C, D, h0):
        return ssd(x, dt, A, B, C, D=D, chunk_size=8, initial_state=h0, reset=reset, reverse=reverse,
                   return_final_state=True)

    ins = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, kw["D"], h0)]
    (y3, s3), (y2, h2) = m3(*ins), m2(*ins)
    torch.testing.assert_close(y3, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s3.ssm, h2, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y2)
    g3 = torch.autograd.grad((y3 * gy).sum() + s3.ssm.sum(), ins)
    g2 = torch.autograd.grad((y2 * gy).sum() + h2.sum(), ins)
    assert_all_close(g3, g2)


def test_mimo_rank_one_is_siso():
    args, kw = make(2, 37, 4, 3, 2, 6, None, 2, seed=5)
    x, dt, A, trap, B, C = args
    st0 = kw["initial_state"]
    mimo_kw = {"angles": kw["angles"], "B_bias": kw["B_bias"].unsqueeze(1), "C_bias": kw["C_bias"].unsqueeze(1),
               "D": kw["D"], "initial_state": Mamba3ScanState(st0.angle, st0.ssm, st0.k.unsqueeze(1),
                                                              st0.x.unsqueeze(1))}
    y1, s1 = mamba3(*args, **kw, return_final_state=True)
    yr, sr = mamba3(x.unsqueeze(2), dt, A, trap, B.unsqueeze(2), C.unsqueeze(2), **mimo_kw, return_final_state=True)
    torch.testing.assert_close(yr.squeeze(2), y1, rtol=0, atol=0)
    assert_all_close([s1.angle, s1.ssm, s1.k, s1.x], [sr.angle, sr.ssm, sr.k.squeeze(1), sr.x.squeeze(1)], 0)


@pytest.mark.parametrize("rank", [None, 3])
def test_step_equals_parallel(rank):
    args, kw = make(2, 19, 4, 3, 2, 6, rank, 2, seed=7)
    y, st_ = mamba3(*args, **kw, return_final_state=True)
    x, dt, A, trap, B, C = args
    state, ys = kw["initial_state"], []
    for t in range(x.shape[1]):
        yt, state = mamba3_step(x[:, t], dt[:, t], A[:, t], trap[:, t], B[:, t], C[:, t], state,
                                angles=kw["angles"][:, t], B_bias=kw["B_bias"], C_bias=kw["C_bias"], D=kw["D"])
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-10, atol=1e-10)
    assert_all_close(list(state), list(st_))


def _slice(args, kw, a, b):
    sl = [t[:, a:b] for t in args]
    return sl, {**kw, "angles": kw["angles"][:, a:b]}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("rank", [None, 2])
def test_state_in_out_chunked_equals_whole(reverse, rank):
    args, kw = make(2, 50, 2, 3, 1, 4, rank, 2, seed=11)
    y, st_ = mamba3(*args, **kw, reverse=reverse, return_final_state=True)
    cut = 21
    parts = [(cut, 50), (0, cut)] if reverse else [(0, cut), (cut, 50)]
    state, ys = kw["initial_state"], {}
    for a, b in parts:
        sa, ska = _slice(args, kw, a, b)
        ys[a], state = mamba3(*sa, **{**ska, "initial_state": state}, reverse=reverse, return_final_state=True)
    torch.testing.assert_close(torch.cat([ys[0], ys[cut]], 1), y, rtol=1e-10, atol=1e-10)
    assert_all_close(list(state), list(st_))


@pytest.mark.parametrize("reverse", [False, True])
def test_reset_packing_equals_alone(reverse):
    args, kw = make(1, 30, 2, 2, 2, 4, 2, 1, state=False, seed=13)
    starts = [0, 7, 8, 19]
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, starts] = True
    y = mamba3(*args, **kw, reset=reset, reverse=reverse)
    for a, b in zip(starts, starts[1:] + [30], strict=True):
        sa, ska = _slice(args, kw, a, b)
        torch.testing.assert_close(y[:, a:b], mamba3(*sa, **ska, reverse=reverse), rtol=1e-10, atol=1e-10)


def test_torch_path_matches_kernel():
    args, kw = make(2, 40, 4, 3, 2, 6, 2, 2, seed=17)
    out, grads = run(mamba3, args, kw)
    with fused_kernels(False):
        out_t, grads_t = run(mamba3, args, kw)
    assert_all_close(out, out_t)
    assert_all_close(grads, grads_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_accumulates_in_float32(dtype):
    args, kw = make(2, 40, 2, 4, 1, 4, None, 2, state=False, seed=19)
    half = [t.to(dtype) for t in args]
    hkw = {k: v.to(dtype) if k == "angles" else v.float() for k, v in kw.items()}
    y, st_ = mamba3(*half, **hkw, return_final_state=True)
    assert y.dtype == dtype and all(t.dtype == torch.float32 for t in st_)
    ref, st_r = R.mamba3(*[t.float() for t in half], **{**hkw, "angles": hkw["angles"].float()},
                         return_final_state=True)
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)
    assert_all_close(list(st_), list(st_r), 1e-5)


def test_bad_inputs_are_named():
    args, kw = make(1, 5, 2, 2, 1, 4, None, 1, state=False)
    x, dt, A, trap, B, C = args
    with pytest.raises(ValueError, match="trap must have shape"):
        mamba3(x, dt, A, trap[:, :4], B, C)
    with pytest.raises(ValueError, match="groups must divide heads"):
        mamba3(x, dt, A, trap, B.expand(1, 5, 3, 4), C.expand(1, 5, 3, 4))
    with pytest.raises(ValueError, match="2 \\* S must be <= N"):
        mamba3(x, dt, A, trap, B, C, angles=torch.zeros(1, 5, 2, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="B_bias must have rank 2"):
        mamba3(x, dt, A, trap, B, C, B_bias=torch.zeros(2, 1, 4, dtype=x.dtype))
    with pytest.raises(TypeError, match="dt has dtype"):
        mamba3(x, dt.float(), A, trap, B, C)
    with pytest.raises(ValueError, match="initial_state.k must have shape"):
        st0 = Mamba3ScanState(x.new_zeros(1, 2, 0), x.new_zeros(1, 2, 2, 4), x.new_zeros(1, 2, 3), x.new_zeros(1, 2, 2))
        mamba3(x, dt, A, trap, B, C, initial_state=st0)

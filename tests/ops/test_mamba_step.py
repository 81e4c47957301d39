"""The fused Mamba decode step and block stack: against the oracle (float32 and float64, biases, int8 weights,
any batch), the torch path, one-thread execution, state reuse, gradients, errors."""

from __future__ import annotations

import contextlib
import importlib

import numba
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import fused_kernels, quantize_int8, reference
from ssmkit.ops.mamba_step import MambaStackPlan, MambaStepWeights, cached_plan, mamba_stack_step, mamba_step

stack_plan_module = importlib.import_module("ssmkit.ops.mamba_stack_plan")  # mamba_stack_step reads kernel_threads here


def make_weights(d_model, di, n, rank, width, *, bias, conv_bias, int8=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    w = dict(in_w=r(2 * di, d_model, scale=d_model ** -0.5), in_b=r(2 * di) if bias else None,
             conv_w=r(di, width, scale=0.5), conv_b=r(di) if conv_bias else None,
             x_w=r(rank + 2 * n, di, scale=di ** -0.5), dt_w=r(di, rank, scale=rank ** -0.5), dt_b=r(di) - 2,
             a_log=r(di, n, scale=0.5), d=r(di), out_w=r(d_model, di, scale=di ** -0.5),
             out_b=r(d_model) if bias else None)
    if int8:
        for name in ("in", "x", "out"):
            q, s = quantize_int8(w[f"{name}_w"].float())
            w[f"{name}_w"], w[f"{name}_scale"] = q, s.to(dtype)
    return MambaStepWeights(**w)


def states(batch, di, n, width, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, di, width - 1, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(batch, di, n, generator=g, dtype=torch.float64).to(dtype))


def assert_all_close(got, want, tol):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 9), d_model=st.integers(1, 40), di=st.integers(1, 70), n=st.integers(1, 9),
       rank=st.integers(1, 6), width=st.integers(1, 5), bias=st.booleans(), conv_bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fused_step_matches_oracle(batch, d_model, di, n, rank, width, bias, conv_bias, dtype):
    w = make_weights(d_model, di, n, rank, width, bias=bias, conv_bias=conv_bias, dtype=dtype)
    x = torch.randn(batch, d_model, dtype=dtype)
    conv, ssm = states(batch, di, n, width, dtype)
    want = reference.mamba_step(x, w, conv, ssm)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_all_close(mamba_step(x, w, conv, ssm), want, tol)
    with fused_kernels(False):  # the torch path
        assert_all_close(mamba_step(x, w, conv, ssm), want, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_with_16_states_matches_oracle(dtype):
    """d_state 16 takes the scan's fused state-update-and-readout loop (the other sizes, above, do not)."""
    w = make_weights(12, 70, 16, 3, 4, bias=True, conv_bias=True, dtype=dtype)
    x = torch.randn(3, 12, dtype=dtype)
    conv, ssm = states(3, 70, 16, 4, dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_all_close(mamba_step(x, w, conv, ssm), reference.mamba_step(x, w, conv, ssm), tol)


@pytest.mark.parametrize("batch", [1, 6])
def test_int8_weights_match_oracle(batch):
    w = make_weights(24, 48, 8, 3, 4, bias=True, conv_bias=True, int8=True)
    x = torch.randn(batch, 24)
    conv, ssm = states(batch, 48, 8, 4, torch.float32)
    want = reference.mamba_step(x.double(), w, conv.double(), ssm.double())
    for got in (mamba_step(x, w, conv, ssm), mamba_step(x, w, conv, ssm, owner=torch.nn.Module())):
        assert_all_close([t.double() for t in got], want, 1e-5)


def _stack(n_layers, d_model=16, di=32, n=4, rank=2, width=4, dtype=torch.float64, bias=True):
    layers = [make_weights(d_model, di, n, rank, width, bias=bias, conv_bias=True, dtype=dtype, seed=i)
              for i in range(n_layers)]
    g = torch.Generator().manual_seed(99)
    norms = [(1 + 0.1 * torch.randn(d_model, generator=g, dtype=torch.float64)).to(dtype) for _ in layers]
    final = (1 + 0.1 * torch.randn(d_model, generator=g, dtype=torch.float64)).to(dtype)
    return layers, norms, final


def _oracle_stack(h, layers, norms, final, eps, convs, ssms, head=None):
    return reference.mamba_stack_step(h, layers, norms, eps, final, eps, convs, ssms, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_stack_matches_oracle_and_reuses_its_states(dtype, batch):
    layers, norms, final = _stack(3, dtype=dtype)
    plan = MambaStackPlan(layers, norms, final, norm_eps=1e-5, final_eps=1e-5)
    assert plan.fusable
    convs, ssms = zip(*(states(batch, 32, 4, 4, dtype, seed=i) for i in range(3)), strict=True)
    convs, ssms = list(convs), list(ssms)
    h = torch.randn(batch, 16, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    want_c, want_s = convs, ssms
    for step in range(3):  # later steps get the views of the stacked states the kernel returned
        x = h + step
        out, convs, ssms, logits = mamba_stack_step(x, plan, convs, ssms)
        assert logits is None
        want, want_c, want_s, _ = _oracle_stack(x, layers, norms, final, 1e-5, want_c, want_s)
        assert_all_close([out, *convs, *ssms], [want, *want_c, *want_s], tol)
    assert convs[1]._base is not None, "the kernel's states are views of one stacked tensor"
    with fused_kernels(False):
        got = mamba_stack_step(h, plan, convs, ssms)
    want = _oracle_stack(h, layers, norms, final, 1e-5, want_c, want_s)
    assert_all_close([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], tol)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_stack_with_head_matches_oracle(int8, bias):
    layers, norms, final = _stack(2, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    hw, hb = torch.randn(203, 16, generator=g), (torch.randn(203, generator=g) if bias else None)
    head = (*quantize_int8(hw), hb) if int8 else (hw, None, hb)
    plan = MambaStackPlan(layers, norms, final, norm_eps=1e-5, final_eps=1e-5, head=head)
    convs, ssms = zip(*(states(3, 32, 4, 4, torch.float32, seed=i) for i in range(2)), strict=True)
    h = torch.randn(3, 16)
    want = _oracle_stack(h.double(), layers, norms, final, 1e-5, [c.double() for c in convs],
                         [s.double() for s in ssms], head)
    got = mamba_stack_step(h, plan, list(convs), list(ssms))
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    with fused_kernels(False):
        torch.testing.assert_close(mamba_stack_step(h, plan, list(convs), list(ssms))[3].double(), want[3],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_any_number_of_regions_on_fewer_threads_gives_the_same_bits(threads, monkeypatch):
    """The kernel splits each stage into one region per nominal thread; the threads that actually run claim
    chunks of their own region and then steal. With more regions than running threads (down to truly one
    thread, which then runs every iteration itself) nothing deadlocks and every row is computed in the same
    order, so the result is bitwise the same."""
    layers, norms, final = _stack(2, dtype=torch.float32)
    plan = MambaStackPlan(layers, norms, final, norm_eps=1e-5, final_eps=1e-5)
    convs, ssms = zip(*(states(2, 32, 4, 4, torch.float32, seed=i) for i in range(2)), strict=True)
    h = torch.randn(2, 16)
    want = mamba_stack_step(h, plan, list(convs), list(ssms))
    seen, regions = [], [1]

    @contextlib.contextmanager
    def regions_on_threads(work):
        old = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            seen.append((regions[0], numba.get_num_threads()))
            yield regions[0]
        finally:
            numba.set_num_threads(old)

    monkeypatch.setattr(stack_plan_module, "kernel_threads", regions_on_threads)
    for regions[0] in (1, 3, 5, 8):
        got = mamba_stack_step(h, plan, list(convs), list(ssms))
        for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], strict=True):
            assert torch.equal(a, b)
    assert seen == [(r, threads) for r in (1, 3, 5, 8)]


def test_in_place_updates_of_a_copied_weight_rebuild_the_plan():
    """A non-contiguous weight is copied into the plan, so its in-place updates must change the plan's key."""
    w = make_weights(8, 16, 4, 2, 4, bias=True, conv_bias=True)
    w = w._replace(in_w=w.in_w.t().contiguous().t())  # same values, transposed strides
    assert not w.in_w.is_contiguous()
    owner = torch.nn.Module()
    x = torch.randn(2, 8)
    conv, ssm = states(2, 16, 4, 4, torch.float32)
    p1 = cached_plan(owner, w)
    assert cached_plan(owner, w) is p1
    with torch.no_grad():
        w.in_w.mul_(-0.5)
    assert cached_plan(owner, w) is not p1
    want = reference.mamba_step(x.double(), w, conv.double(), ssm.double())
    assert_all_close([t.double() for t in mamba_step(x, w, conv, ssm, owner=owner)], want, 1e-5)


def test_plan_epsilons_are_keyword_only():
    layers, norms, final = _stack(1, dtype=torch.float32)
    with pytest.raises(TypeError):
        MambaStackPlan(layers, norms, final, 1e-5, 1e-5)


def test_gradients_take_the_torch_path():
    w = make_weights(8, 16, 4, 2, 4, bias=True, conv_bias=True, dtype=torch.float64)
    w = w._replace(in_w=w.in_w.clone().requires_grad_())
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    conv, ssm = states(2, 16, 4, 4, torch.float64)
    y, _, s = mamba_step(x, w, conv, ssm)
    (y.sum() + s.sum()).backward()
    assert x.grad is not None and w.in_w.grad is not None
    torch.autograd.gradcheck(lambda v: mamba_step(v, w, conv, ssm)[0], (x,))


def test_cached_plan_follows_the_weights_storage():
    layers, norms, final = _stack(1, dtype=torch.float32)
    owner = torch.nn.Module()
    p1 = cached_plan(owner, layers[0])
    assert cached_plan(owner, layers[0]) is p1
    layers[0].in_w.mul_(2)  # in place: the plan's views see it
    assert cached_plan(owner, layers[0]) is p1
    moved = [layers[0]._replace(in_w=layers[0].in_w.clone())]
    assert cached_plan(owner, moved[0]) is not p1


def test_bad_arguments_name_what_is_wrong():
    w = make_weights(8, 16, 4, 2, 4, bias=False, conv_bias=True)
    conv, ssm = states(2, 16, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        mamba_step(torch.randn(8), w, conv, ssm)
    with pytest.raises(ValueError, match="weights.in_w"):
        mamba_step(torch.randn(2, 9), w, conv, ssm)
    with pytest.raises(ValueError, match="conv_state"):
        mamba_step(torch.randn(2, 8), w, conv[:, :, :2], ssm)
    with pytest.raises(ValueError, match="ssm_state"):
        mamba_step(torch.randn(2, 8), w, conv, ssm[:1])
    with pytest.raises(ValueError, match="weights.x_w"):
        mamba_step(torch.randn(2, 8), w._replace(x_w=w.x_w[:-1]), conv, ssm)
    with pytest.raises(ValueError, match="in_scale"):
        mamba_step(torch.randn(2, 8), w._replace(in_scale=torch.ones(32)), conv, ssm)
    with pytest.raises(TypeError, match="MambaStepWeights"):
        mamba_step(torch.randn(2, 8), tuple(w), conv, ssm)
    layers, norms, final = _stack(2, dtype=torch.float32)
    mixed = [layers[0], layers[1]._replace(in_b=None)]
    with pytest.raises(ValueError, match=r"layers\[1\].in_b"):
        MambaStackPlan(mixed, norms, final, norm_eps=1e-5, final_eps=1e-5)  # layer 0 has biases, layer 1 not
    with pytest.raises(ValueError, match="norm_weights"):
        MambaStackPlan(layers[:1], norms, final, norm_eps=1e-5, final_eps=1e-5)
    plan = MambaStackPlan(layers[:1], norms[:1], final, norm_eps=1e-5, final_eps=1e-5)
    with pytest.raises(ValueError, match="need 1 conv and ssm states"):
        mamba_stack_step(torch.randn(2, 16), plan, [], [])

"""SSD's factored-decay path (ops/_ssd_factored.py, ops/_ssd_core.py) against the float64 oracle, and its
hand-over to the segment-sum path where the factors would leave the normal range."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import reference as R
from ssmkit.ops import ssd
from ssmkit.ops._ssd_factored import FACTORED

ssd_mod = importlib.import_module("ssmkit.ops.ssd")


def inputs(length, heads, groups, seed, dtype=torch.float64, dt_scale=1.0, A=None):
    g = torch.Generator().manual_seed(seed)
    P, N = 3, 4
    x = torch.randn(2, length, heads, P, generator=g, dtype=torch.float64)
    dt = dt_scale * torch.nn.functional.softplus(torch.randn(2, length, heads, generator=g, dtype=torch.float64))
    A = -(torch.rand(heads, generator=g, dtype=torch.float64) + 0.1) if A is None else A
    B, C = (torch.randn(2, length, groups, N, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.randn(heads, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, heads, P, N, generator=g, dtype=torch.float64)
    reset = torch.rand(2, length, generator=g) < 0.15
    return [t.to(dtype) for t in (x, dt, A, B, C, D, h0)], reset


def outputs(fn, leaves, reset, reverse, **kw):
    """y, the final state and the gradients of a fixed random loss w.r.t. x, dt, A, B, C, D, h0."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y, hT = fn(*leaves[:5], D=leaves[5], initial_state=leaves[6], reset=reset, reverse=reverse,
               return_final_state=True, **kw)
    g = torch.Generator().manual_seed(5)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    wh = torch.randn(hT.shape, generator=g, dtype=torch.float64).to(hT.dtype)
    return [y, hT, *torch.autograd.grad((y * wy).sum() + (hT * wh).sum(), leaves)]


def close(got, want, tol):
    for name, a, b in zip("y hT x dt A B C D h0".split(), got, want, strict=True):
        # relative to the reference's largest entry; absolute where that is 0 (a reset at position 0 leaves h0's
        # gradient exactly zero)
        scale = b.double().abs().max().item() or 1.0
        err = (a.double() - b.double()).abs().max().item() / scale
        assert err < tol, (name, err)


@pytest.fixture
def no_segment_sums(monkeypatch):
    """Fails any call of the segment-sum path: the factored path must serve every piece."""
    def fail(*args):
        raise AssertionError("segment-sum path taken")
    monkeypatch.setattr(ssd_mod, "_ssd_chunked", fail)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(2, 45), chunk=st.integers(2, 9), groups=st.sampled_from([1, 2]),
       use_reset=st.booleans(), reverse=st.booleans(), seed=st.integers(0, 1000))
def test_factored_path_matches_reference_float64(length, chunk, groups, use_reset, reverse, seed):
    leaves, reset = inputs(length, 2 * groups, groups, seed)
    reset = reset if use_reset else None
    saved = ssd_mod._ssd_chunked
    ssd_mod._ssd_chunked = None  # the factored path must serve every piece (None is not callable)
    try:
        got = outputs(ssd, leaves, reset, reverse, chunk_size=chunk)
    finally:
        ssd_mod._ssd_chunked = saved
    close(got, outputs(R.ssd, leaves, reset, reverse), 1e-10)


@pytest.mark.parametrize("groups", [1, 2])
def test_factored_path_float32(groups, no_segment_sums):
    """float32 at Mamba-2-like sizes (chunk 16, 3 chunks, resets): float32 accuracy in every output."""
    leaves, reset = inputs(48, 4, groups, 3, dtype=torch.float32, dt_scale=0.3)
    got = outputs(ssd, leaves, reset, False, chunk_size=16)
    close(got, outputs(R.ssd, [t.double() for t in leaves], reset, False), 1e-5)


def test_wide_decay_ranges_fall_back_piece_by_piece(monkeypatch):
    """Pieces whose chunks decay by more than the factors can carry in float64 (exp(+-354)) run the segment-sum
    path, the others the factored one, the state handed across: equal to the oracle, and each path was taken."""
    length, chunk = 24, 4
    leaves, reset = inputs(length, 2, 1, 9, A=torch.tensor([-0.5, -200.0], dtype=torch.float64))
    leaves[1][:, : length // 2] *= 0.01  # first half: chunk decays ~1; second half: ~300 per step in head 1
    leaves[1][:, length // 2:] += 1.0
    calls = {"segment sums": 0}
    seg = ssd_mod._ssd_chunked

    def counted(*args):
        calls["segment sums"] += 1
        return seg(*args)

    monkeypatch.setattr(ssd_mod, "_ssd_chunked", counted)
    monkeypatch.setattr(ssd_mod, "PIECE", 8)
    got = outputs(ssd, leaves, reset, False, chunk_size=chunk)
    assert 0 < calls["segment sums"] < length // 8
    close(got, outputs(R.ssd, leaves, reset, False), 1e-10)


def test_switch_off_runs_segment_sums_with_the_same_result(monkeypatch):
    leaves, reset = inputs(30, 4, 2, 11)
    on = outputs(ssd, leaves, reset, True, chunk_size=8)
    monkeypatch.setitem(FACTORED, "enabled", False)
    close(on, outputs(ssd, leaves, reset, True, chunk_size=8), 1e-12)


def test_a_nan_row_does_not_send_a_wide_range_row_down_the_factored_path():
    """A NaN in one sequence must not hide another sequence's decay range from the fallback check: the other
    row must stay finite (review finding: NaN > threshold is False)."""
    leaves, _ = inputs(64, 2, 1, 3)
    x, dt, A, B, C = leaves[:5]
    dt = torch.full_like(dt, 3.0)  # a decay range of 3 x 64 = 192 per chunk: wider than float32's factors hold
    dt[0, 5, 0] = float("nan")
    args = [t.float() for t in (x, dt, -torch.ones_like(A), B, C)]
    y = ssd(*args, chunk_size=64)
    assert torch.isfinite(y[1]).all()
    assert torch.isnan(y[0]).any()  # the NaN itself is not hidden


def test_a_reset_at_the_start_zeroes_h0s_gradient():
    """The example hypothesis found (a reset at position 0: h0's gradient is exactly zero on both paths)."""
    leaves, reset = inputs(33, 2, 1, 352)
    reset[:, 0] = True
    got, want = outputs(ssd, leaves, reset, False, chunk_size=2), outputs(R.ssd, leaves, reset, False)
    assert not want[-1].any() and not got[-1].any()
    close(got, want, 1e-10)


# (heads, groups of B) each path receives: one group shared; a group split (a copy of B per head); a whole group
@pytest.mark.parametrize(("groups", "wide", "reverse", "want_seg", "want_fac"), [
    (1, [1], False, (1, 1), (3, 1)), (2, [1], True, (1, 1), (3, 3)), (2, [2, 3], False, (2, 1), (2, 1))])
def test_too_wide_heads_alone_take_segment_sums(monkeypatch, groups, wide, reverse, want_seg, want_fac):
    """Only the heads whose chunk decays exceed the factors' range (here exp(-200 dt) per step, in float64) run
    the segment-sum path; the other heads stay on the factored one (a head splitting its group takes its own copy
    of B and C, a whole group keeps the group's); equal to the oracle, outputs, state and gradients."""
    heads = 4
    A = torch.full((heads,), -0.5, dtype=torch.float64)
    A[wide] = -200.0
    leaves, reset = inputs(21, heads, groups, 4, A=A, dt_scale=1.0)
    leaves[1] = leaves[1] + 1.0  # every step of a wide head decays by more than exp(-200)
    seen = {"factored": [], "segment sums": []}
    factored, seg = ssd_mod.ssd_factored, ssd_mod._ssd_chunked

    def spy(name, fn):
        def f(*args):
            seen[name].append((args[0].shape[2], args[3].shape[2]))  # heads, groups of B
            return fn(*args)
        return f

    monkeypatch.setattr(ssd_mod, "ssd_factored", spy("factored", factored))
    monkeypatch.setattr(ssd_mod, "_ssd_chunked", spy("segment sums", seg))
    got = outputs(ssd, leaves, reset, reverse, chunk_size=4)
    assert seen["segment sums"] == [want_seg] and seen["factored"] == [want_fac]
    close(got, outputs(R.ssd, leaves, reset, reverse), 1e-10)

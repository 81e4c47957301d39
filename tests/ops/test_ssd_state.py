"""The fused SSD chunk-state pass against a plain loop (autograd for its gradients), float64 and float32."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import reference as R
from ssmkit.ops._ssd_state import ROWS, state_pass


def loop(S, total, h0):
    """h_{c+1} = total_c h_c + S_c, entering[:, c] = h_c: the definition, one chunk at a time."""
    h = torch.zeros_like(S[:, 0]) if h0 is None else h0
    starts = []
    for c in range(S.shape[1]):
        starts.append(h)
        h = total[:, c, :, None, :, None] * h + S[:, c]
    return torch.stack(starts, 1), h


def inputs(b, c, G, N, R, P, dtype, seed, use_h0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(b, c, G, N, R, P, generator=g, dtype=torch.float64)
    total = torch.rand(b, c, G, R, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, G, N, R, P, generator=g, dtype=torch.float64) if use_h0 else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (S, total, h0)]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 6), G=st.integers(1, 2), N=st.integers(1, 5), R=st.integers(1, 3),
       P=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]), use_h0=st.booleans(),
       grad_h=st.booleans(), seed=st.integers(0, 1000))
def test_matches_loop_forward_and_gradients(b, c, G, N, R, P, dtype, use_h0, grad_h, seed):
    S, total, h0 = inputs(b, c, G, N, R, P, dtype, seed, use_h0)
    ent, hT = state_pass(S, total, h0)
    Sr, tr, hr = (None if t is None else t.detach().double().requires_grad_() for t in (S, total, h0))
    ent_r, hT_r = loop(Sr, tr, hr)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ent.double(), ent_r, rtol=tol, atol=tol)
    torch.testing.assert_close(hT.double(), hT_r, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(seed + 1)
    w_ent = torch.randn(ent.shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(hT.shape, generator=g, dtype=torch.float64) if grad_h else None
    leaves = [t for t in (S, total, h0) if t is not None]
    leaves_r = [t for t in (Sr, tr, hr) if t is not None]
    # with grad_h False the final state is unused: its gradient arrives as None
    loss = (ent.double() * w_ent).sum() + ((hT.double() * w_h).sum() if grad_h else 0)
    loss_r = (ent_r * w_ent).sum() + ((hT_r * w_h).sum() if grad_h else 0)
    loss_r = loss_r + sum(0 * t.sum() for t in leaves_r)  # one chunk and no h0: entering is constant zero
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_r, leaves_r), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("N", [ROWS, ROWS + 1, 2 * ROWS + 5])
def test_several_row_blocks(N):
    """N past one task's block of rows (and a partial last block): forward and gradients against the loop."""
    S, total, h0 = inputs(2, 4, 2, N, 3, 5, torch.float64, N, True)
    got = state_pass(S, total, h0)
    want = loop(S, total, h0)
    w = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
         for i, t in enumerate(want)]
    g_got = torch.autograd.grad(sum((a * b).sum() for a, b in zip(got, w, strict=True)), (S, total, h0))
    g_want = torch.autograd.grad(sum((a * b).sum() for a, b in zip(want, w, strict=True)), (S, total, h0))
    for a, b in zip((*got, *g_got), (*want, *g_want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    S, total, h0 = inputs(1, 3, 2, 2, 2, 3, torch.float64, 0, True)
    assert torch.autograd.gradcheck(lambda *a: state_pass(*a), (S, total, h0))


def test_bad_shapes_name_the_argument():
    S, total, h0 = inputs(1, 3, 1, 2, 2, 3, torch.float64, 0, True)
    with pytest.raises(ValueError, match="total"):
        state_pass(S, total[:, :2], h0)
    with pytest.raises(ValueError, match="h0"):
        state_pass(S, total, h0[..., :2])
    with pytest.raises(TypeError, match="total"):
        state_pass(S, total.float(), h0)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 40), chunk=st.integers(1, 6), piece=st.integers(1, 12), groups=st.integers(1, 2),
       use_reset=st.booleans(), reverse=st.booleans(), seed=st.integers(0, 1000))
def test_ssd_in_pieces_matches_reference(length, chunk, piece, groups, use_reset, reverse, seed):
    """ssd over pieces of whole chunks (the state carried from piece to piece) equals the float64 oracle,
    outputs, final state and every gradient; PIECE is lowered so short sequences split."""
    ssd_mod = importlib.import_module("ssmkit.ops.ssd")
    g = torch.Generator().manual_seed(seed)
    heads, P, N = 2 * groups, 3, 4
    x = torch.randn(2, length, heads, P, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(2, length, heads, generator=g, dtype=torch.float64) - 1)
    A = -(torch.rand(heads, generator=g, dtype=torch.float64) * 2 + 0.05)
    B, C = (torch.randn(2, length, groups, N, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.randn(heads, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, heads, P, N, generator=g, dtype=torch.float64)
    reset = torch.rand(2, length, generator=g) < 0.2 if use_reset else None
    w = torch.randn(2, length, heads, P, generator=g, dtype=torch.float64)
    wh = torch.randn(2, heads, P, N, generator=g, dtype=torch.float64)

    def run(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
        y, hT = fn(*leaves[:5], D=leaves[5], initial_state=leaves[6], reset=reset, reverse=reverse,
                   return_final_state=True, **kw)
        return (y, hT, *torch.autograd.grad((y * w).sum() + (hT * wh).sum(), leaves))

    old = ssd_mod.PIECE
    ssd_mod.PIECE = piece
    try:
        got = run(ssd_mod.ssd, chunk_size=chunk)
    finally:
        ssd_mod.PIECE = old
    for a, b in zip(got, run(R.ssd), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

"""GatedSSM and RGLRU: an explicit per-token oracle, the contract in both directions, init and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.layers import RGLRU, GatedSSM
from ssmkit.layers.gated import GatedSSMState, RGLRUState
from tests.layers.contract import (
    assert_close,
    check_gradcheck_with_state,
    check_reset_packing,
    check_split_state,
    check_step_equivalence,
    tol,
)

LAYERS = [GatedSSM, RGLRU]
STATES = {GatedSSM: GatedSSMState, RGLRU: RGLRUState}


def make(cls, d_model: int = 6, dtype: torch.dtype = torch.float64, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(d_model, **kw).to(dtype)


def gelu(t):
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def gated_cell(m: GatedSSM):
    """One token of the gated SSM written from the definition, on the raw weights."""
    n, W, c = m.d_state, m.in_proj.weight, m.in_proj.bias

    def cell(x, h):
        pre = W @ x + c
        i, z, o, f = pre[:n], pre[n : 2 * n], pre[2 * n : 3 * n], pre[3 * n :]
        h = torch.sigmoid(f) * h + torch.sigmoid(i) * z
        return m.out_proj.weight @ (gelu(o) * h) + m.out_proj.bias, h

    return cell


def rglru_cell(m: RGLRU):
    """One token of the RG-LRU block written from the definition, on the raw weights."""
    n = m.d_state

    def cell(x, h):
        proj = m.in_proj.weight @ x + (0 if m.in_proj.bias is None else m.in_proj.bias)
        u, g = (proj[:n], proj[n:]) if m.gate else (proj, None)
        pre = m.gate_proj.weight @ u + m.gate_proj.bias
        r, i = torch.sigmoid(pre[:n]), torch.sigmoid(pre[n:])
        a = torch.exp(-m.c * r * torch.log1p(torch.exp(m.lam)))
        h = a * h + torch.sqrt(1 - a**2) * (i * u)
        out = h if g is None else gelu(g) * h
        return m.out_proj.weight @ out + (0 if m.out_proj.bias is None else m.out_proj.bias), h

    return cell


def oracle(m, x, h0=None, reset=None):
    """Run each segment of each row on its own with the per-token cell, left to right or right to left.

    h0 enters the first segment (left to right, unless reset[:, 0]) or the last segment (right to left).
    """
    cell = gated_cell(m) if isinstance(m, GatedSSM) else rglru_cell(m)
    batch, length, _ = x.shape
    y = torch.empty_like(x)
    for b in range(batch):
        starts = [0] + [t for t in range(1, length) if reset is not None and bool(reset[b, t])]
        bounds = list(zip(starts, starts[1:] + [length], strict=True))
        for si, (s, e) in enumerate(bounds):
            gets_h0 = (
                si == len(bounds) - 1 if m.reverse else (si == 0 and not (reset is not None and reset[b, 0]))
            )
            h = h0[b] if (h0 is not None and gets_h0) else torch.zeros(m.d_state, dtype=x.dtype)
            for t in range(e - 1, s - 1, -1) if m.reverse else range(s, e):
                y[b, t], h = cell(x[b, t], h)
    return y


def step_all(m, x):
    """Step every token from init_state, in processing order; outputs returned in sequence order."""
    state = m.init_state(x.shape[0], dtype=x.dtype)
    out = [None] * x.shape[1]
    order = range(x.shape[1] - 1, -1, -1) if m.reverse else range(x.shape[1])
    for t in order:
        out[t], state = m.step(x[:, t], state)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_matches_oracle(cls, reverse):
    m = make(cls, 5, d_state=4, reverse=reverse)
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    reset = torch.zeros(3, 9, dtype=torch.bool)
    reset[0, [0, 4]] = True
    reset[1, [2, 3, 8]] = True
    h0 = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x), oracle(m, x), 1e-12, f"{cls.__name__} vs oracle")
        assert_close(
            m(x, STATES[cls](h=h0), reset=reset),
            oracle(m, x, h0, reset),
            1e-12,
            f"{cls.__name__} vs oracle with state and reset",
        )


def test_rglru_without_gate_matches_oracle():
    m = make(RGLRU, 4, d_state=3, gate=False, bias=False, c=5.0)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x), oracle(m, x), 1e-12, "RGLRU(gate=False) vs oracle")


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=8)
@given(batch=st.integers(1, 3), length=st.integers(1, 12))
def test_step_equals_forward(cls, reverse, dtype, batch, length):
    m = make(cls, 6, dtype, d_state=5, reverse=reverse)
    x = torch.randn(batch, length, 6, dtype=dtype)
    if not reverse:
        check_step_equivalence(m, x)
    with torch.no_grad():
        y, s = m(x, return_final_state=True)
        ys, s_steps = step_all(m, x)
    assert_close(ys, y, tol(dtype), f"{cls.__name__} step vs forward (reverse={reverse})")
    assert_close(s_steps.h, s.h, tol(dtype), f"{cls.__name__} final state")


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("reverse", [False, True])
@settings(max_examples=8)
@given(length=st.integers(2, 14), data=st.data())
def test_split_with_state(cls, reverse, length, data):
    t = data.draw(st.integers(1, length - 1))
    m = make(cls, 4, d_state=6, reverse=reverse)
    x = torch.randn(2, length, 4, dtype=torch.float64)
    if not reverse:
        check_split_state(m, x, t)
        return
    with torch.no_grad():  # right to left: the right piece first, its state enters the left piece
        y, s = m(x, return_final_state=True)
        y2, s2 = m(x[:, t:], return_final_state=True)
        y1, s1 = m(x[:, :t], s2, return_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y, tol(x.dtype), "reverse split")
    assert_close(s1.h, s.h, tol(x.dtype), "reverse split final state")


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_reset_packing(cls, reverse):
    m = make(cls, 4, reverse=reverse)
    seqs = [torch.randn(1, n, 4, dtype=torch.float64) for n in (3, 1, 5)]
    check_reset_packing(m, seqs)


@pytest.mark.parametrize("cls", LAYERS)
def test_reverse_is_forward_on_flipped_input(cls):
    m = make(cls, 5)
    r = copy.deepcopy(m)
    r.reverse = True
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(r(x), m(x.flip(1)).flip(1), 1e-12, "reverse vs flipped forward")
        assert not torch.allclose(r(x), m(x)), "reverse must differ from forward"


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(cls, reverse):
    m = make(cls, 3, d_state=2, reverse=reverse)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, dtype=torch.float64)
    reset = torch.tensor([[False, False, True, False, False], [True, False, False, False, True]])
    check_gradcheck_with_state(m, x, STATES[cls](h=h0), reset=reset, eps=1e-6, atol=1e-5, fast_mode=True)


def test_gated_forget_gate_init():
    m = GatedSSM(16, d_state=64)
    f_bias = torch.sigmoid(m.in_proj.bias[3 * 64 :].double())
    assert f_bias.min() >= 0.9 - 1e-6 and f_bias.max() <= 0.99 + 1e-6
    with torch.no_grad():
        f, _, _ = m._gates(torch.randn(4, 32, 16))
    assert 0.85 < f.mean().item() < 0.99, f"initial forget gate mean {f.mean().item():.3f} not near 0.9-0.99"


def test_rglru_decay_init_and_stable_sqrt():
    m = RGLRU(8, d_state=256)
    a_c = torch.exp(-m.c * torch.nn.functional.softplus(m.lam.double()))
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    assert a_c.max() - a_c.min() > 0.05, "decays should spread over [0.9, 0.999]"
    # a very close to 1: √(1 - a²) must stay accurate in float32 (a naive 1 - a*a would round to 0)
    with torch.no_grad():
        m.lam.fill_(-20.0)
    x = torch.randn(2, 3, 8)
    a, b, _ = m._coeffs(x)
    m64 = copy.deepcopy(m).double()
    a64, b64, _ = m64._coeffs(x.double())
    assert_close(b.double(), b64, 1e-5, "RG-LRU input scaling near a = 1")
    assert (b != 0).any()
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(m.lam.grad).all()


@pytest.mark.parametrize("cls", LAYERS)
def test_float32_state_for_bf16_inputs(cls):
    m = make(cls, 4, torch.float32)
    x = torch.randn(2, 6, 4)
    mb = copy.deepcopy(m).to(torch.bfloat16)
    yb, s = mb(x.to(torch.bfloat16), return_final_state=True)
    assert s.h.dtype == torch.float32 and mb.init_state(2).h.dtype == torch.float32
    with torch.no_grad():
        assert_close(yb.float(), m(x), 5e-2, "bf16 vs fp32")
    yt, _ = mb.step(x[:, 0].to(torch.bfloat16), mb.init_state(2))
    assert yt.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_input(cls):
    m = make(cls, 4)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    other = RGLRU if cls is GatedSSM else GatedSSM
    with pytest.raises(ValueError, match="d_model=4"):
        m(torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.float())
    with pytest.raises(TypeError, match=f"{STATES[cls].__name__}"):
        m(x, make(other, 4).init_state(2))
    with pytest.raises(ValueError, match="batch_size=2"):
        m(x, m.init_state(3))
    with pytest.raises(TypeError, match="state.h must have dtype"):
        m(x, m.init_state(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="reset"):
        m(x, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reset"):
        m(x, reset=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="x_t"):
        m.step(x, m.init_state(2))
    with pytest.raises(ValueError, match="d_state"):
        cls(4, d_state=0)
    with pytest.raises(ValueError, match="d_model"):
        cls(0)
    with pytest.raises(TypeError, match="reverse"):
        cls(4, reverse="yes")


def test_bad_options():
    with pytest.raises(ValueError, match="c must be"):
        RGLRU(4, c=-1.0)
    with pytest.raises(ValueError, match="a_init"):
        RGLRU(4, a_init=(0.9, 1.0))
    with pytest.raises(ValueError, match="f_init"):
        GatedSSM(4, f_init=(0.5, 1.2))
    with pytest.raises(TypeError, match="gate"):
        RGLRU(4, gate=1)

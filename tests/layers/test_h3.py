"""H3: the layer contract, FlashConv-style blocked state passing, and the paper's equations as a loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.layers import H3, LongConv
from ssmkit.layers.h3 import H3State
from tests.layers.contract import (
    assert_close,
    check_bf16_close_to_f32,
    check_gradcheck_with_state,
    check_reset_packing,
    check_split_state,
    check_step_equivalence,
    tol,
)

MODES = ("conv", "scan", "auto")
HEADS = (None, 2, 1)  # d_model=4: head_dim 1, 2 and 4


def make(d_model: int = 4, dtype=torch.float64, seed: int = 0, **kw) -> H3:
    torch.manual_seed(seed)
    kw.setdefault("d_state", 4)
    kw.setdefault("shift_len", 3)
    return H3(d_model, **kw).to(dtype).eval()


def random_state(layer: H3, batch: int, dtype=torch.float64, seed: int = 1) -> H3State:
    g = torch.Generator().manual_seed(seed)
    s = layer.init_state(batch, dtype=dtype)
    ssm = torch.complex(torch.randn(s.ssm.shape, generator=g, dtype=dtype),
                        torch.randn(s.ssm.shape, generator=g, dtype=dtype))
    return H3State(shift=torch.randn(s.shift.shape, generator=g, dtype=dtype), ssm=ssm.to(s.ssm.dtype))


def paper_loop(layer: H3, x, state=None, reset=None):
    """H3 (Algorithm 1 of the paper) one position at a time, in float64.

    Shift SSM: X_t = S X_{t-1} + e_1 k_t (S the shift matrix), k̄_t = C_shift X_t. Diagonal SSM per head,
    ZOH: s_t = exp(ΔA) s_{t-1} + (exp(ΔA) - 1)/A · B z_t, y_t = 2 Re(C s_t) + D z_t, on z = k̄_i v_j per head.
    O_t[h, j] = sum_i q_t[h, i] KV_t[h, i, j]; out = W_o O + b_o. A True reset at t zeroes X and s first.
    """
    batch, length, d = x.shape
    H, P = layer.n_heads, layer.head_dim
    lin = lambda m, a: a @ m.weight.T + m.bias  # noqa: E731
    q, k, v = lin(layer.q_proj, x), lin(layer.k_proj, x), lin(layer.v_proj, x)
    w = layer.shift.weight[:, 0]  # (d, W); w[:, -1] multiplies the current input
    W = w.shape[1]
    S = torch.diag(torch.ones(W - 1, dtype=x.dtype), -1)  # shift matrix: X[m] <- X[m-1]
    e1 = torch.zeros(W, dtype=x.dtype)
    e1[0] = 1
    C_shift = w.flip(-1)  # X[m] holds k_{t-m}
    dt, A, B, C = layer.ssm.ssm_parameters()
    dA = torch.exp(dt[:, None] * A)
    dB = (dA - 1) / A * B
    X = torch.zeros(batch, d, W, dtype=x.dtype)
    s = torch.zeros(batch, P, P, H, A.shape[1], dtype=dA.dtype)
    if state is not None:
        X[..., : W - 1] = state.shift.flip(-1)
        s = state.ssm.clone()
    ys = []
    for t in range(length):
        if reset is not None:
            X = X * (~reset[:, t]).to(x.dtype)[:, None, None]
            s = s * (~reset[:, t]).to(s.real.dtype)[:, None, None, None, None]
        X = torch.einsum("mn,bdn->bdm", S, X) + e1 * k[:, t, :, None]
        kbar = (C_shift * X).sum(-1)
        z = torch.einsum("bhi,bhj->bijh", kbar.view(batch, H, P), v[:, t].view(batch, H, P))
        s = dA * s + dB * z[..., None]
        KV = 2 * (s * C).sum(-1).real + layer.ssm.D * z
        O = torch.einsum("bhi,bijh->bhj", q[:, t].view(batch, H, P), KV).reshape(batch, d)
        ys.append(lin(layer.out_proj, O))
    return torch.stack(ys, 1), H3State(shift=X[..., : W - 1].flip(-1), ssm=s)


# --------------------------------------------------------------------------------- the paper's equations
@pytest.mark.parametrize("n_heads", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_paper_loop(n_heads, mode):
    layer = make(n_heads=n_heads, mode=mode, seed=3)
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    with torch.no_grad():
        y, s = layer(x, return_final_state=True)
        want, s_want = paper_loop(layer, x)
    assert_close(y, want, 1e-10, f"H3 vs paper loop (n_heads={n_heads}, {mode})")
    assert_close(s.ssm, s_want.ssm, 1e-10, "ssm state")
    assert_close(s.shift, s_want.shift, 1e-12, "shift state")


@pytest.mark.parametrize("n_heads", HEADS)
@pytest.mark.parametrize("block_len", [None, 2])
def test_matches_paper_loop_with_state_and_reset(n_heads, block_len):
    layer = make(n_heads=n_heads, block_len=block_len, seed=4, shift_len=4)
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    state = random_state(layer, 3)
    reset = torch.zeros(3, 10, dtype=torch.bool)
    reset[0, 0] = True
    reset[1, 4] = True
    reset[1, 6] = True
    with torch.no_grad():
        y, s = layer(x, state, reset=reset, return_final_state=True)
        want, s_want = paper_loop(layer, x, state, reset)
    assert_close(y, want, 1e-10, "H3 vs paper loop with state and reset")
    assert_close(s.ssm, s_want.ssm, 1e-10, "ssm state")
    assert_close(s.shift, s_want.shift, 1e-12, "shift state")


# ----------------------------------------------------------------------------- FlashConv state passing
@given(
    length=st.integers(1, 20), block_len=st.integers(1, 24), n_heads=st.sampled_from(HEADS),
    mode=st.sampled_from(MODES), with_state=st.booleans(), seed=st.integers(0, 2**16),
)
def test_blocked_equals_one_block(length, block_len, n_heads, mode, with_state, seed):
    layer = make(n_heads=n_heads, mode=mode, seed=seed)
    x = torch.randn(2, length, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    state = random_state(layer, 2, seed=seed) if with_state else None
    with torch.no_grad():
        y, s = layer(x, state, return_final_state=True)
        layer.block_len = block_len
        yb, sb = layer(x, state, return_final_state=True)
        yb_only = layer(x, state)
    assert_close(yb, y, 1e-10, f"blocked ({block_len}) vs one block")
    assert_close(yb_only, y, 1e-10, "blocked without state out")
    assert_close(sb.ssm, s.ssm, 1e-10, "final ssm state")
    assert torch.equal(sb.shift, s.shift)


def test_blocked_float32_long():
    layer = make(d_model=8, n_heads=4, d_state=16, dtype=torch.float32, mode="conv")
    x = torch.randn(2, 300, 8)
    with torch.no_grad():
        y = layer(x)
        layer.block_len = 64
        yb = layer(x)
    assert_close(yb, y, tol(torch.float32), "blocked float32, 5 blocks")


# ------------------------------------------------------------------------------------ contract invariants
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_heads", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_step_equals_forward(dtype, n_heads, mode):
    layer = make(n_heads=n_heads, mode=mode, dtype=dtype, block_len=5)
    check_step_equivalence(layer, torch.randn(2, 17, 4, dtype=dtype))


@given(length=st.integers(2, 24), data=st.data(), n_heads=st.sampled_from(HEADS), mode=st.sampled_from(MODES))
def test_split_with_state(length, data, n_heads, mode):
    t = data.draw(st.integers(1, length - 1))
    layer = make(n_heads=n_heads, mode=mode, dtype=torch.float32)
    check_split_state(layer, torch.randn(2, length, 4), t)


@pytest.mark.parametrize("n_heads", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_reset_packing(n_heads, mode):
    layer = make(n_heads=n_heads, mode=mode, dtype=torch.float32, block_len=4)
    check_reset_packing(layer, [torch.randn(1, n, 4) for n in (6, 1, 9, 2)])


@given(length=st.integers(1, 30), n_heads=st.sampled_from(HEADS), with_state=st.booleans(),
       with_reset=st.booleans(), seed=st.integers(0, 2**16))
def test_modes_agree(length, n_heads, with_state, with_reset, seed):
    layer = make(n_heads=n_heads, dtype=torch.float32, seed=seed, d_state=8)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 4, generator=g)
    state = random_state(layer, 2, dtype=torch.float32, seed=seed) if with_state else None
    reset = torch.rand(2, length, generator=g) < 0.2 if with_reset else None
    outs = {}
    with torch.no_grad():
        for mode in MODES:
            layer.mode = mode
            outs[mode] = layer(x, state, reset=reset, return_final_state=True)
    for mode in ("scan", "auto"):
        assert_close(outs[mode][0], outs["conv"][0], tol(torch.float32), f"{mode} vs conv")
        assert_close(outs[mode][1].ssm, outs["conv"][1].ssm, tol(torch.float32), f"{mode} ssm state")


@pytest.mark.parametrize("mode", ["conv", "scan"])
def test_gradcheck(mode):
    layer = make(n_heads=2, mode=mode, block_len=3, d_state=2)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    names = ("ssm.log_dt", "ssm.A_im", "ssm.C", "shift.weight", "q_proj.weight")
    check_gradcheck_with_state(layer, x, random_state(layer, 2), names=names, fast_mode=True)


def test_gradients_finite_float32():
    layer = make(d_model=8, n_heads=4, dtype=torch.float32, d_state=16, block_len=16)
    x = torch.randn(2, 40, 8, requires_grad=True)
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[1, 25] = True
    layer(x, reset=reset).square().sum().backward()
    for name, g in [("x", x.grad), *((n, p.grad) for n, p in layer.named_parameters())]:
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_bfloat16_close_to_float32():
    check_bf16_close_to_f32(make(d_model=8, n_heads=4, d_state=8, dtype=torch.float32), torch.randn(2, 30, 8))


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    layer = make(n_heads=2, dtype=torch.float32)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="d_model=4"):
        layer.step(torch.randn(2, 3), layer.init_state(2))
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(x, layer.init_state(3))
    with pytest.raises(ValueError, match="state.ssm"):
        layer(x, make(n_heads=4, dtype=torch.float32).init_state(2))
    with pytest.raises(ValueError, match="state.shift"):
        layer.step(x[:, 0], make(n_heads=2, shift_len=5, dtype=torch.float32).init_state(2))
    with pytest.raises(TypeError, match="H3State"):
        layer(x, LongConv(4, kernel_len=3).init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="state.shift"):
        layer(x, layer.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        layer(x, reset=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mode.*'auto', 'conv', 'scan'"):
        H3(4, mode="fft")
    with pytest.raises(ValueError, match="mode.*'auto', 'conv', 'scan'"):
        layer.mode = "fast"
    for kw, name in (
        ({"n_heads": 3}, "n_heads"),
        ({"n_heads": 0}, "n_heads"),
        ({"shift_len": 0}, "shift_len"),
        ({"block_len": 0}, "block_len"),
        ({"d_state": 3}, "d_state"),
        ({"init": "nope"}, "init"),
        ({"disc": "euler"}, "disc"),
    ):
        with pytest.raises(ValueError, match=name):
            H3(4, **kw)
    with pytest.raises(ValueError, match="d_model"):
        H3(0)

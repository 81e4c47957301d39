"""S4D: the layer contract, mode agreement, the kernel against a closed form, blocking, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.init import log_uniform_dt, s4d_init
from ssmkit.layers import S4D
from ssmkit.layers import s4d as s4d_mod
from ssmkit.ops.reference import direct_conv_matrix
from tests.layers.contract import (
    assert_close,
    check_contract,
    check_reverse_contract,
    tol,
)

INITS = ("legs", "lin", "inv", "real")
DISCS = ("zoh", "bilinear")
DTYPES = (torch.float32, torch.float64)


def make(d_model=3, d_state=8, dtype=torch.float64, seed=0, **kw) -> S4D:
    torch.manual_seed(seed)
    return S4D(d_model, d_state, dtype=dtype, **kw)


layer_args = st.fixed_dictionaries({
    "d_model": st.integers(1, 4),
    "d_state": st.sampled_from([2, 4, 8]),
    "init": st.sampled_from(INITS),
    "disc": st.sampled_from(DISCS),
    "mode": st.sampled_from(("auto", "conv", "scan")),
    "output": st.sampled_from(("gelu_linear", "glu", "none")),
    "dtype": st.sampled_from(DTYPES),
    "seed": st.integers(0, 100),
})


# --------------------------------------------------------------------------------------- contract invariants
@given(args=layer_args, batch=st.integers(1, 3), length=st.integers(1, 40), data=st.data())
def test_contract_causal(args, batch, length, data):
    layer = make(**args)
    x = torch.randn(batch, length, layer.d_model, dtype=args["dtype"])
    t = data.draw(st.integers(1, length - 1)) if length > 1 else None
    lens = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    check_contract(layer, x, t, [torch.randn(1, n, layer.d_model, dtype=args["dtype"]) for n in lens])


@given(args=layer_args, batch=st.integers(1, 3), length=st.integers(2, 40), data=st.data())
def test_contract_reverse(args, batch, length, data):
    """reverse=True: stepping last-to-first equals forward; [t, L) first, then its state into [0, t)."""
    layer = make(reverse=True, **args)
    dt = args["dtype"]
    x = torch.randn(batch, length, layer.d_model, dtype=dt)
    t = data.draw(st.integers(1, length - 1))
    lens = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    check_reverse_contract(layer, x, t, [torch.randn(1, n, layer.d_model, dtype=dt) for n in lens])


def test_reverse_is_time_flip():
    """A reverse layer on x equals the same causal layer on flipped x, flipped back."""
    fwd, rev = make(init="lin"), make(init="lin", reverse=True)
    rev.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 17, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close(rev(x), fwd(x.flip(1)).flip(1), 1e-12, "reverse vs flip")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_modes_agree(reverse, dtype):
    layer = make(d_model=4, d_state=8, init="legs", dtype=dtype, reverse=reverse)
    x = torch.randn(2, 33, 4, dtype=dtype)
    s0 = layer.init_state(2, dtype=dtype)
    s0.s.normal_()
    reset = torch.rand(2, 33) < 0.15
    outs = {}
    with torch.no_grad():
        for mode in ("auto", "conv", "scan"):
            layer.mode = mode
            with_reset = layer(x, s0, reset=reset, return_final_state=True)
            outs[mode] = (layer(x), layer(x, s0, return_final_state=True), with_reset)
    for mode in ("auto", "conv"):
        assert_close(outs[mode][0], outs["scan"][0], tol(dtype), f"{mode} vs scan")
        for i in (1, 2):
            assert_close(outs[mode][i][0], outs["scan"][i][0], tol(dtype), f"{mode} vs scan with state ({i})")
            assert_close(outs[mode][i][1].s, outs["scan"][i][1].s, tol(dtype), f"{mode} vs scan state ({i})")


def test_auto_mode_dispatch(monkeypatch):
    """auto: stateless calls use the convolution; state in/out or reset use the scan."""
    layer = make()
    x = torch.randn(1, 9, 3, dtype=torch.float64)

    def boom(*a, **k):
        raise RuntimeError("wrong path")

    real_scan = s4d_mod.diagonal_scan
    monkeypatch.setattr(s4d_mod, "diagonal_scan", boom)
    layer(x)
    with pytest.raises(RuntimeError, match="wrong path"):
        layer(x, return_final_state=True)
    monkeypatch.setattr(s4d_mod, "diagonal_scan", real_scan)
    monkeypatch.setattr(s4d_mod, "diagonal_conv", boom)
    layer(x, return_final_state=True)
    layer(x, reset=torch.zeros(1, 9, dtype=torch.bool))
    layer.mode = "conv"
    layer(x, reset=torch.zeros(1, 9, dtype=torch.bool))  # conv mode runs resets through the scan
    with pytest.raises(RuntimeError, match="wrong path"):
        layer(x)


# --------------------------------------------------------------------------------------- kernel
def closed_form_kernel(layer: S4D, L: int) -> torch.Tensor:
    """K_l = 2 Re Σ_n C_n B̄_n Ā_n^l from the raw parameters, float64, powers by repeated multiplication."""
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    dt = torch.exp(p["log_dt"])[:, None]
    A = -torch.exp(p["A_log_re"]) + 1j * p["A_im"]
    B, C = torch.view_as_complex(p["B"]), torch.view_as_complex(p["C"])
    if layer.disc == "zoh":
        dA = torch.exp(dt * A)
        dB = (dA - 1) / A * B
    else:
        dA = (1 + dt * A / 2) / (1 - dt * A / 2)
        dB = dt / (1 - dt * A / 2) * B
    powers, p_l = [], torch.ones_like(dA)
    for _ in range(L):
        powers.append(p_l)
        p_l = p_l * dA
    return 2 * torch.einsum("hn,hnl->hl", C * dB, torch.stack(powers, -1)).real


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("disc", DISCS)
def test_kernel_closed_form(init, disc):
    layer = make(d_model=3, d_state=16, init=init, disc=disc, dtype=torch.float64)
    with torch.no_grad():
        layer.log_dt.copy_(torch.log(torch.tensor([1e-3, 2e-2, 1e-1], dtype=torch.float64)))
        K = layer.kernel(64)
    ref = closed_form_kernel(layer, 64)
    assert K.shape == (3, 64)
    assert_close(K, ref, 1e-12, f"kernel {init}/{disc}")
    # and in float32 the layer's kernel stays close to the float64 truth
    layer32 = make(d_model=3, d_state=16, init=init, disc=disc, dtype=torch.float32)
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        assert_close(layer32.kernel(64).double(), ref, 1e-4, f"float32 kernel {init}/{disc}")


@pytest.mark.parametrize("reverse", [False, True])
def test_forward_is_kernel_convolution(reverse):
    """output="none": y = K * x + D x, K from kernel() (anti-causal when reverse), via a Toeplitz product."""
    layer = make(output="none", reverse=reverse, init="inv")
    x = torch.randn(2, 21, 3, dtype=torch.float64)
    with torch.no_grad():
        K = layer.kernel(21)
        xin = x.flip(1) if reverse else x
        ref = direct_conv_matrix(xin, K) + xin * layer.D
        ref = ref.flip(1) if reverse else ref
        for mode in ("conv", "scan"):
            layer.mode = mode
            assert_close(layer(x), ref, 1e-12, f"{mode} vs Toeplitz")


def test_init_values():
    for init in INITS:
        layer = make(d_model=5, d_state=12, init=init, dt_min=2e-3, dt_max=5e-2)
        dt, A, B, _ = layer.ssm_parameters()
        A0, B0 = s4d_init(init, 12)
        assert torch.allclose(A, A0.expand(5, 6)) and torch.allclose(B, B0.expand(5, 6))
        assert bool(((dt >= 2e-3 * (1 - 1e-9)) & (dt <= 5e-2 * (1 + 1e-9))).all())
    dts = log_uniform_dt(20000, 1e-3, 1e-1, generator=torch.Generator().manual_seed(0))
    logs = torch.log10(dts)
    assert logs.min() >= -3 and logs.max() <= -1
    assert abs(logs.mean().item() + 2) < 0.02 and abs(logs.std().item() - 2 / math.sqrt(12)) < 0.02


@pytest.mark.parametrize("block", [1, 5, 36])
def test_blocked_vandermonde_matches_single_block(monkeypatch, block):
    """Any split l = b·T + j of the powers (ragged last block too) gives the same kernel, outputs and states
    as one block (T = L)."""
    layer = make(d_model=3, d_state=8, init="legs", mode="conv")
    x = torch.randn(2, 37, 3, dtype=torch.float64)
    s0 = layer.init_state(2)
    s0.s.normal_()
    with torch.no_grad():
        monkeypatch.setattr(s4d_mod, "VANDERMONDE_BLOCK", 10**6)
        ref = (layer.kernel(37), layer(x, s0, return_final_state=True))
        monkeypatch.setattr(s4d_mod, "VANDERMONDE_BLOCK", block)
        got = (layer.kernel(37), layer(x, s0, return_final_state=True))
    assert_close(got[0], ref[0], 1e-12, "blocked kernel")
    assert_close(got[1][0], ref[1][0], 1e-12, "blocked conv output")
    assert_close(got[1][1].s, ref[1][1].s, 1e-12, "blocked conv state")


def test_chunked_scan_matches(monkeypatch):
    layer = make(d_model=3, d_state=8, init="lin", mode="scan")
    x = torch.randn(2, 37, 3, dtype=torch.float64)
    reset = torch.rand(2, 37) < 0.1
    s0 = layer.init_state(2)
    s0.s.normal_()
    with torch.no_grad():
        ref = layer(x, s0, reset=reset, return_final_state=True)
        monkeypatch.setattr(s4d_mod, "BLOCK_ELEMS", 2 * 12 * 4)  # scan chunks of 4 positions
        got = layer(x, s0, reset=reset, return_final_state=True)
    assert_close(got[0], ref[0], 1e-12, "chunked scan output")
    assert_close(got[1].s, ref[1].s, 1e-12, "chunked scan state")


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", ["conv", "scan"])
@pytest.mark.parametrize("disc", DISCS)
def test_gradcheck(mode, disc):
    layer = make(d_model=2, d_state=4, init="legs", disc=disc, mode=mode, output="none")
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 2, dtype=torch.complex128, requires_grad=True)

    def f(x, s0, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)),
                                         (x, s4d_mod.S4DState(s=s0)), {"return_final_state": True})
        return out[0], torch.view_as_real(out[1].s)

    # the full Jacobian for one case; random projections of it (fast_mode) for the others
    fast = (mode, disc) != ("scan", "zoh")
    assert torch.autograd.gradcheck(f, (x, s0, *params), eps=1e-6, atol=1e-6, fast_mode=fast)
    layer(x.detach()).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# --------------------------------------------------------------------------------------- bad input
def test_bad_input():
    layer = make(d_model=3, d_state=8, dtype=torch.float32)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="d_model=3"):
        layer(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="d_model=3"):
        layer.step(torch.randn(2, 4), layer.init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(x, layer.init_state(3))
    with pytest.raises(ValueError, match="state.s"):
        layer(x, make(d_model=3, d_state=4, dtype=torch.float32).init_state(2))
    with pytest.raises(TypeError, match="S4DState"):
        layer(x, (torch.zeros(2, 3, 4, dtype=torch.complex64),))
    with pytest.raises(TypeError, match="state.s must have dtype"):
        layer(x, layer.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        layer(x, reset=torch.zeros(2, 4, dtype=torch.bool))
    for kw, what in [({"init": "foo"}, "init"), ({"mode": "fast"}, "mode"), ({"disc": "euler"}, "disc"),
                     ({"output": "relu"}, "output")]:
        with pytest.raises(ValueError, match=f"unknown {what} .*expected one of"):
            S4D(3, **kw)
    with pytest.raises(ValueError, match="d_state"):
        S4D(3, 7)
    with pytest.raises(ValueError, match="d_model"):
        S4D(0)
    with pytest.raises(ValueError, match="dt_min"):
        S4D(3, dt_min=0.2, dt_max=0.1)
    with pytest.raises(TypeError, match="reverse"):
        S4D(3, reverse="yes")
    layer.mode = "fft"
    with pytest.raises(ValueError, match="unknown mode 'fft'"):
        layer(x)
    with pytest.raises(ValueError, match="length"):
        layer.kernel(0)


def test_defaults_and_state():
    layer = S4D(4)
    assert layer.d_state == 64 and layer.init == "legs" and layer.disc == "zoh" and layer.mode == "auto"
    s = layer.init_state(2)
    assert s.s.shape == (2, 4, 32) and s.s.dtype == torch.complex64
    assert layer.init_state(1, dtype=torch.float64).s.dtype == torch.complex128
    y, s2 = layer(torch.randn(2, 10, 4), return_final_state=True)
    assert y.shape == (2, 10, 4) and s2.s.shape == (2, 4, 32)


def test_bf16_close_to_fp32():
    """A bf16 layer computes the SSM in float32/complex64; its output stays near the fp32 layer's."""
    torch.manual_seed(0)
    lb = S4D(4, 8).bfloat16()
    lf = S4D(4, 8)
    lf.load_state_dict({k: v.float() for k, v in lb.state_dict().items()})
    x = torch.randn(2, 30, 4).bfloat16()
    with torch.no_grad():
        y, s = lb(x, return_final_state=True)
        assert y.dtype == torch.bfloat16 and s.s.dtype == torch.complex64
        assert_close(y.float(), lf(x.float()), 2e-2, "bf16 vs fp32")

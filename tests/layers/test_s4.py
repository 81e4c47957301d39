"""S4 (DPLR): the layer contract, mode agreement, the Cauchy/Woodbury kernel against dense matrix powers,
the PTD diagonal variant, gradients and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.init import nplr
from ssmkit.layers import S4, S4D
from ssmkit.layers import s4 as s4_mod
from ssmkit.ops.reference import direct_conv_matrix
from tests.layers.contract import (
    assert_close,
    check_contract,
    check_reverse_contract,
    check_step_equivalence,
    tol,
)

INITS = ("legs", "legt", "fout", "ptd")
DTYPES = (torch.float32, torch.float64)


def make(d_model=3, d_state=8, dtype=torch.float64, seed=0, **kw) -> S4:
    torch.manual_seed(seed)
    return S4(d_model, d_state, dtype=dtype, **kw)


def jiggle(layer: S4, scale: float = 0.2, seed: int = 1) -> S4:
    """Move every SSM parameter off its structured init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("out"):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


def dense_kernel(layer: S4, L: int) -> torch.Tensor:
    """K_l = C_full Ā^l B̄ from the explicit complex N×N DPLR matrix, bilinear, float64, powers one by one."""
    dt, Lam, P, B, C = layer.ssm_parameters(torch.float64)
    Lf = torch.cat([Lam, Lam.conj()], -1)
    Pf = torch.cat([P, P.conj()], -1)
    A = torch.diag_embed(Lf) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    M = eye - dt[:, None, None] / 2 * A
    dA = torch.linalg.solve(M, eye + dt[:, None, None] / 2 * A)
    v = dt[:, None] * torch.linalg.solve(M, torch.cat([B, B.conj()], -1)[..., None])[..., 0]
    Cf = torch.cat([C, C.conj()], -1)
    ks = []
    for _ in range(L):
        ks.append((Cf * v).sum(-1))
        v = torch.einsum("hij,hj->hi", dA, v)
    K = torch.stack(ks, -1)
    assert K.imag.abs().max() < 1e-9 * max(1.0, K.abs().max().item())
    return K.real


layer_args = st.fixed_dictionaries({
    "d_model": st.integers(1, 3),
    "d_state": st.sampled_from([2, 4, 8]),
    "init": st.sampled_from(INITS),
    "mode": st.sampled_from(("auto", "conv", "scan")),
    "output": st.sampled_from(("gelu_linear", "glu", "none")),
    "dtype": st.sampled_from(DTYPES),
    "seed": st.integers(0, 100),
})


# --------------------------------------------------------------------------------------- contract invariants
@given(args=layer_args, batch=st.integers(1, 3), length=st.integers(1, 32), data=st.data())
def test_contract_causal(args, batch, length, data):
    layer = make(**args)
    x = torch.randn(batch, length, layer.d_model, dtype=args["dtype"])
    t = data.draw(st.integers(1, length - 1)) if length > 1 else None
    lens = data.draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    check_contract(layer, x, t, [torch.randn(1, n, layer.d_model, dtype=args["dtype"]) for n in lens])


@given(args=layer_args, batch=st.integers(1, 2), length=st.integers(2, 32), data=st.data())
def test_contract_reverse(args, batch, length, data):
    layer = make(reverse=True, **args)
    dt = args["dtype"]
    x = torch.randn(batch, length, layer.d_model, dtype=dt)
    t = data.draw(st.integers(1, length - 1))
    lens = data.draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    check_reverse_contract(layer, x, t, [torch.randn(1, n, layer.d_model, dtype=dt) for n in lens])


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modes_agree(init, dtype):
    layer = make(d_model=3, d_state=16, init=init, dtype=dtype)
    x = torch.randn(2, 40, 3, dtype=dtype)
    s0 = layer.init_state(2, dtype=dtype)
    s0.s.normal_()
    reset = torch.rand(2, 40) < 0.15
    outs = {}
    with torch.no_grad():
        for mode in ("auto", "conv", "scan"):
            layer.mode = mode
            outs[mode] = (layer(x), layer(x, s0, reset=reset, return_final_state=True))
    for mode in ("auto", "conv"):
        assert_close(outs[mode][0], outs["scan"][0], tol(dtype), f"{init} {mode} vs scan")
        assert_close(outs[mode][1][0], outs["scan"][1][0], tol(dtype), f"{init} {mode} vs scan, state+reset")


# --------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("init", ["legs", "legt", "fout"])
@pytest.mark.parametrize("L", [32, 31])
@pytest.mark.parametrize("moved", [False, True])
def test_dplr_kernel_equals_dense_powers(init, L, moved):
    """Cauchy + Woodbury at the roots of unity with the C̃ correction == C Ā^l B̄ from dense matrix powers."""
    layer = make(d_model=3, d_state=8, init=init)
    with torch.no_grad():
        layer.log_dt.copy_(torch.log(torch.tensor([1e-3, 2e-2, 1e-1], dtype=torch.float64)))
    if moved:
        jiggle(layer)
    with torch.no_grad():
        ref = dense_kernel(layer, L)
        assert_close(layer.kernel(L), ref, 1e-10, f"{init} DPLR kernel, L={L}")
        l32 = make(d_model=3, d_state=8, init=init, dtype=torch.float32)
        l32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        assert_close(l32.kernel(L).double(), ref, 1e-5, f"{init} float32 DPLR kernel")


def test_dplr_kernel_frequency_blocks(monkeypatch):
    layer = jiggle(make(d_model=2, d_state=8, init="legt"))
    with torch.no_grad():
        ref = layer.kernel(40)
        monkeypatch.setattr(s4_mod, "FREQ_BLOCK_ELEMS", 2 * 4 * 3)  # 3 frequencies per block, ragged last block
        assert_close(layer.kernel(40), ref, 1e-12, "frequency-blocked kernel")


@pytest.mark.parametrize("init", INITS)
def test_forward_is_kernel_convolution(init):
    layer = jiggle(make(init=init, output="none"), 0.05)
    x = torch.randn(2, 23, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = direct_conv_matrix(x, layer.kernel(23)) + x * layer.D
        for mode in ("conv", "scan"):
            layer.mode = mode
            assert_close(layer(x), ref, 1e-10, f"{init} {mode} vs Toeplitz")


def test_init_values():
    for init in ("legs", "legt", "fout"):
        layer = make(d_model=2, d_state=8, init=init)
        f = nplr(init, 8)
        _, Lam, P, B, _ = layer.ssm_parameters(torch.float64)
        assert torch.allclose(Lam.imag, f.Lambda.imag.expand(2, 4))
        assert torch.allclose(Lam.real, f.Lambda.real.clamp(max=-s4_mod.RE_FLOOR).expand(2, 4))
        assert torch.allclose(P, f.P[:, None].expand(-1, 2, -1)) and torch.allclose(B, f.B.expand(2, 4))
        assert layer.rank == {"legs": 1, "legt": 2, "fout": 1}[init]
    layer = make(init="ptd")
    assert layer.diagonal and not hasattr(layer, "P")
    _, Lam, _, B, _ = layer.ssm_parameters(torch.float64)
    assert bool((Lam.real < 0).all())
    assert B.abs().pow(2).mean().sqrt().item() == pytest.approx(1.0)


def test_ptd_uses_s4d_machinery():
    """init="ptd" is a bilinear diagonal SSM: same output as an S4D carrying the same parameters."""
    s4 = jiggle(make(init="ptd", output="none"), 0.05)
    s4d = S4D(3, 8, init="lin", disc="bilinear", output="none", dtype=torch.float64)
    with torch.no_grad():
        s4d.log_dt.copy_(s4.log_dt)
        s4d.A_log_re.copy_(s4.Lambda_log_re)
        s4d.A_im.copy_(s4.Lambda_im)
        for n in ("B", "C", "D"):
            getattr(s4d, n).copy_(getattr(s4, n))
        x = torch.randn(2, 19, 3, dtype=torch.float64)
        assert_close(s4(x), s4d(x), 1e-12, "S4-PTD vs S4D")
        assert_close(s4.kernel(19), s4d.kernel(19), 1e-12, "S4-PTD kernel vs S4D kernel")


def test_discretisation_cache_follows_parameter_updates():
    """The no-grad cache of the dense discretisation is invalidated by in-place updates and by dtype moves."""
    layer = make(init="legt", mode="scan")
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    with torch.no_grad():
        y0 = layer(x)
        layer.log_dt.add_(0.5)
        layer.P.mul_(1.5)
        y1 = layer(x)
        assert (y1 - y0).abs().max() > 1e-3
        check_step_equivalence(layer, x)
        layer.mode = "conv"
        assert_close(layer(x), y1, 1e-10, "conv after update")
    layer.float()
    check_step_equivalence(layer, x.float())
    layer.double()
    y, _ = layer.step(x[:, 0], layer.init_state(2))  # with autograd: no cache, gradients flow
    y.sum().backward()
    assert layer.P.grad is not None and torch.isfinite(layer.P.grad).all()


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("init,mode", [("legs", "conv"), ("legt", "scan"), ("ptd", "conv")])
def test_gradcheck(init, mode):
    layer = make(d_model=2, d_state=4, init=init, mode=mode, output="none")
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    # fast_mode: checks random projections of the Jacobian (the full one is slow through the DPLR kernel)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_state():
    layer = make(d_model=2, d_state=4, init="fout", mode="scan", output="none")
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 2, dtype=torch.complex128, requires_grad=True)

    def f(x, s0):
        y, s = layer(x, s4_mod.S4State(s=s0), return_final_state=True)
        return y, torch.view_as_real(s.s)

    assert torch.autograd.gradcheck(f, (x, s0), eps=1e-6, atol=1e-6)
    layer.float()(torch.randn(2, 9, 2)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# --------------------------------------------------------------------------------------- bad input
def test_bad_input():
    layer = make(d_model=3, d_state=8, dtype=torch.float32)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="d_model=3"):
        layer(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="d_model=3"):
        layer.step(torch.randn(2, 2), layer.init_state(2))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(ValueError, match="batch_size=2"):
        layer(x, layer.init_state(1))
    with pytest.raises(TypeError, match="S4State"):
        layer(x, S4D(3, 8).init_state(2))
    with pytest.raises(ValueError, match="state.s"):
        layer(x, make(d_model=3, d_state=4, dtype=torch.float32).init_state(2))
    with pytest.raises(TypeError, match="state.s must have dtype"):
        layer(x, layer.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        layer(x, reset=torch.zeros(2, 5))
    for kw, what in [({"init": "lin"}, "init"), ({"mode": "fft"}, "mode"), ({"output": "tanh"}, "output")]:
        with pytest.raises(ValueError, match=f"unknown {what} .*expected one of"):
            S4(3, **kw)
    with pytest.raises(ValueError, match="d_state"):
        S4(3, 5)
    with pytest.raises(ValueError, match="ptd_eps"):
        S4(3, init="ptd", ptd_eps=-1.0)
    with pytest.raises(ValueError, match="dt_min"):
        S4(3, dt_min=-1.0)
    layer.mode = "recurrent"
    with pytest.raises(ValueError, match="unknown mode 'recurrent'"):
        layer(x)


def test_defaults_and_state():
    layer = S4(4)
    assert layer.d_state == 64 and layer.init == "legs" and layer.mode == "auto" and layer.rank == 1
    s = layer.init_state(2)
    assert s.s.shape == (2, 4, 32) and s.s.dtype == torch.complex64
    y, s2 = layer(torch.randn(2, 10, 4), return_final_state=True)
    assert y.shape == (2, 10, 4) and s2.s.shape == (2, 4, 32) and s2.s.dtype == torch.complex64


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    lb = S4(4, 8).bfloat16()
    lf = S4(4, 8)
    lf.load_state_dict({k: v.float() for k, v in lb.state_dict().items()})
    x = torch.randn(2, 30, 4).bfloat16()
    with torch.no_grad():
        y, s = lb(x, return_final_state=True)
        assert y.dtype == torch.bfloat16 and s.s.dtype == torch.complex64
        assert_close(y.float(), lf(x.float()), 2e-2, "bf16 vs fp32")

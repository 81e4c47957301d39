"""Mixed precision as in mamba_ssm: 16-bit activations with float32 parameters (selective_scan: A, D, delta_bias;
ssd: A, D). The scan runs in float32, the output comes back in the activations' dtype, and the parameters'
gradients come back in float32 at float32 accuracy (not rounded to 16 bits).

Tolerances (relative to the largest |value| of the float64 oracle run on the same 16-bit activation values):
outputs and activation gradients are rounded to 16 bits once, so 1e-2 (bfloat16 eps is 7.8e-3, float16's
9.8e-4); parameter gradients never pass through 16 bits, so 1e-4 (float32 accumulation over ~100 steps).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ssmkit.ops import fused_kernels, selective_scan, ssd
from ssmkit.ops import reference as R

HALF = [torch.bfloat16, torch.float16]


def rel_err(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12)).item()


def _ss_inputs(half, seed=0, batch=2, length=37, dim=8, N=4, groups=2):
    g = torch.Generator().manual_seed(seed)
    rn = (lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    acts = {"u": rn(batch, length, dim), "delta": rn(batch, length, dim, scale=0.5),
            "B": rn(batch, length, groups, N), "C": rn(batch, length, groups, N), "z": rn(batch, length, dim)}
    params = {"A": -torch.rand(dim, N, generator=g, dtype=torch.float64) * 2, "D": rn(dim),
              "delta_bias": rn(dim, scale=0.3)}
    # the 16-bit activations, the float32 parameters, and float64 copies of exactly those values for the oracle
    acts = {k: v.to(half) for k, v in acts.items()}
    params = {k: v.float() for k, v in params.items()}
    return acts, params


def _run_ss(fn, acts, params, gy):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**acts, **params}.items()}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
             delta_bias=leaves["delta_bias"], delta_softplus=True)
    (out.to(gy.dtype) * gy).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("half", HALF)
def test_selective_scan_half_activations_float32_params(half, fused):
    acts, params = _ss_inputs(half)
    gy = torch.randn(acts["u"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with fused_kernels(fused):
        out, grads = _run_ss(selective_scan, acts, params, gy.to(half))
    want, want_g = _run_ss(R.selective_scan, {k: v.double() for k, v in acts.items()},
                           {k: v.double() for k, v in params.items()}, gy.to(half).double())
    assert out.dtype == half
    assert rel_err(out, want) < 1e-2
    for k in params:
        assert grads[k].dtype == torch.float32, k
        assert rel_err(grads[k], want_g[k]) < 1e-4, (k, rel_err(grads[k], want_g[k]))
    for k in acts:
        assert grads[k].dtype == half, k
        assert rel_err(grads[k], want_g[k]) < 1e-2, (k, rel_err(grads[k], want_g[k]))


def test_selective_scan_mixed_equals_float32_run():
    """The mixed call computes exactly what the float32 call on the upcast activations computes."""
    acts, params = _ss_inputs(torch.bfloat16, seed=3)
    args = lambda a: (a["u"], a["delta"], params["A"], a["B"], a["C"], params["D"], a["z"])  # noqa: E731
    y, h = selective_scan(*args(acts), delta_bias=params["delta_bias"], return_final_state=True)
    y32, h32 = selective_scan(*args({k: v.float() for k, v in acts.items()}), delta_bias=params["delta_bias"],
                              return_final_state=True)
    assert torch.equal(y, y32.bfloat16()) and h.dtype == torch.float32 and torch.equal(h, h32)


def _ssd_inputs(half, seed=0, batch=2, length=45, heads=4, P=3, groups=2, N=5):
    g = torch.Generator().manual_seed(seed)
    rn = (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64))  # noqa: E731
    acts = {"x": rn(batch, length, heads, P), "dt": torch.rand(batch, length, heads, generator=g,
                                                               dtype=torch.float64) + 0.05,
            "B": rn(batch, length, groups, N), "C": rn(batch, length, groups, N)}
    params = {"A": -torch.rand(heads, generator=g, dtype=torch.float64) - 0.1, "D": rn(heads)}
    return {k: v.to(half) for k, v in acts.items()}, {k: v.float() for k, v in params.items()}


def _run_ssd(fn, acts, params, gy, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**acts, **params}.items()}
    y = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], **kw)
    (y.to(gy.dtype) * gy).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("half", HALF)
def test_ssd_half_activations_float32_params(half):
    acts, params = _ssd_inputs(half)
    gy = torch.randn(acts["x"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(half)
    y, grads = _run_ssd(ssd, acts, params, gy, chunk_size=16)
    want, want_g = _run_ssd(R.ssd, {k: v.double() for k, v in acts.items()},
                            {k: v.double() for k, v in params.items()}, gy.double())
    assert y.dtype == half and rel_err(y, want) < 1e-2
    for k in params:
        assert grads[k].dtype == torch.float32 and rel_err(grads[k], want_g[k]) < 1e-4, k
    for k in acts:
        assert grads[k].dtype == half and rel_err(grads[k], want_g[k]) < 1e-2, k


def test_forbidden_mixes_are_one_line_errors():
    acts, params = _ss_inputs(torch.float32)
    u, delta, B, C, z = (acts[k] for k in ("u", "delta", "B", "C", "z"))
    A, D = params["A"], params["D"]
    with pytest.raises(TypeError, match=r"^A has dtype torch.float64 but u has dtype torch.float32; .*float32 with "
                                        r"16-bit activations$"):
        selective_scan(u, delta, A.double(), B, C)  # never cast a float64 parameter down silently
    with pytest.raises(TypeError, match=r"A has dtype torch.float64 but u has dtype torch.bfloat16"):
        selective_scan(u.bfloat16(), delta.bfloat16(), A.double(), B.bfloat16(), C.bfloat16())
    with pytest.raises(TypeError, match=r"D has dtype torch.float16 but u has dtype torch.bfloat16"):
        selective_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D.half())
    with pytest.raises(TypeError, match=r"A has dtype torch.bfloat16 but u has dtype torch.float32"):
        selective_scan(u, delta, A.bfloat16(), B, C)
    with pytest.raises(TypeError, match=r"delta_bias has dtype torch.float64 but u has dtype torch.float32"):
        selective_scan(u, delta, A, B, C, delta_bias=D.double())
    with pytest.raises(TypeError, match=r"B has dtype torch.float32 but u has dtype torch.bfloat16"):
        selective_scan(u.bfloat16(), delta.bfloat16(), A, B, C.bfloat16())  # B and C are activations
    with pytest.raises(TypeError, match=r"z has dtype torch.float32 but u has dtype torch.bfloat16"):
        selective_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), z=z)
    sa, sp = _ssd_inputs(torch.bfloat16)
    with pytest.raises(TypeError, match=r"^A has dtype torch.float64 but x has dtype torch.bfloat16; "):
        ssd(sa["x"], sa["dt"], sp["A"].double(), sa["B"], sa["C"])
    with pytest.raises(TypeError, match=r"dt has dtype torch.float32 but x has dtype torch.bfloat16"):
        ssd(sa["x"], sa["dt"].float(), sp["A"], sa["B"], sa["C"])
    with pytest.raises(TypeError, match=r"D has dtype torch.float64 but x has dtype torch.float32"):
        ssd(sa["x"].float(), sa["dt"].float(), sp["A"], sa["B"].float(), sa["C"].float(), D=sp["D"].double())


def test_ops_ignore_an_enclosing_autocast():
    """Inside torch.autocast the ops still compute in their compute dtype: the same bits as outside."""
    sa, sp = _ssd_inputs(torch.float32, seed=4)
    acts, params = _ss_inputs(torch.float32, seed=4)
    args = (acts["u"], acts["delta"], params["A"], acts["B"], acts["C"], params["D"], acts["z"])
    for fused in (True, False):
        with fused_kernels(fused):
            want_ss = selective_scan(*args)
            want_ssd = ssd(sa["x"], sa["dt"], sp["A"], sa["B"], sa["C"], D=sp["D"], chunk_size=8)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got_ss = selective_scan(*args)
                got_ssd = ssd(sa["x"], sa["dt"], sp["A"], sa["B"], sa["C"], D=sp["D"], chunk_size=8)
        assert torch.equal(got_ss, want_ss) and torch.equal(got_ssd, want_ssd)


class _MatmulOnCopies(TorchFunctionMode):
    """Runs every matmul on copies of its tensor arguments (out= included), as an argument-casting mode does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def test_ssd_under_a_mode_that_copies_matmul_arguments():
    """ssd never relies on out= (a casting mode would write into a temporary and leave garbage)."""
    sa, sp = _ssd_inputs(torch.float32, seed=6)
    leaves = [t.clone().requires_grad_() for t in (sa["x"], sa["dt"], sp["A"], sa["B"], sa["C"])]
    want = ssd(*leaves, chunk_size=8)
    want_g = torch.autograd.grad(want.square().sum(), leaves)
    with _MatmulOnCopies():
        got = ssd(*leaves, chunk_size=8)
        got_g = torch.autograd.grad(got.square().sum(), leaves)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_g, want_g, strict=True))
